#!/usr/bin/env python3
"""Caronni et al.'s figure 6 with real processes, timed (docs/distributed-flat.md): N members
of a flat group on loopback, the controller killed, the members continuing as participants, a
newcomer, an eviction, a leave, then take-back by one participant while another is dead.

Usage: python3 scripts/figure6_processes.py target/release/keycast N
Every wait is bounded; the processes are killed at the end."""
import json, os, socket, subprocess, sys, tempfile, threading, time, queue

K = os.path.abspath(sys.argv[1])
N = int(sys.argv[2])
D = tempfile.mkdtemp(prefix="keycast-figure6-")
def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
port, new_port = free_port(), free_port()
subprocess.run([K, "init", D, "--members", str(N + 1), "--scheme", "flat", "--port", str(port)], check=True, capture_output=True)
for i in range(1, N + 2):
    p = f"{D}/member-{i}.toml"
    t = open(p).read().replace("after_silence_ms = 30000", "after_silence_ms = 3000").replace("handover_within_ms = 20000", "handover_within_ms = 5000")
    open(p, "w").write(t)
srv = open(f"{D}/server.toml").read()
srv2 = srv.replace(f'listen = "127.0.0.1:{port}"', f'listen = "127.0.0.1:{new_port}"').replace('"controller.redb"', '"taken-back.redb"').replace(f"239.255.42.1:{port+1}", f"239.255.42.9:{new_port+1}")
open(f"{D}/taken-back.toml", "w").write(srv2)
env = dict(os.environ, KEYCAST_LOG="error")

class M:
    def __init__(self, i, extra=()):
        self.p = subprocess.Popen([K, "member", "--config", f"member-{i}.toml", "--json", "--for-secs", "300", *extra], cwd=D, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
        children.append(self.p)
        self.q = queue.Queue(); self.lines = []
        threading.Thread(target=self.read, daemon=True).start()
    def read(self):
        for line in self.p.stdout:
            self.q.put((time.time(), json.loads(line)))
    def order(self, o):
        self.p.stdin.write(o + "\n"); self.p.stdin.flush()
    def wait(self, event, within=60, pred=lambda e: True):
        end = time.time() + within
        while time.time() < end:
            try:
                t, e = self.q.get(timeout=max(0.01, end - time.time()))
            except queue.Empty:
                break
            self.lines.append(e)
            if e.get("event") == event and pred(e):
                return t, e
        raise SystemExit(f"no {event} within {within} s: {self.lines[-5:]}")
    def status(self):
        self.order("status"); return self.wait("status", 10)[1]

children = []


def run():
    server = subprocess.Popen([K, "server", "--config", "server.toml"], cwd=D, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children.append(server)
    ms = [M(i, ["--send", "10000", "--interval-ms", "200"] if i == 3 else []) for i in range(1, N + 1)]
    for m in ms: m.wait("key_activated", 120)
    time.sleep(2)
    t0 = time.time(); server.kill(); server.wait()
    conv = [m.wait("participant", 60)[0] - t0 for m in ms]
    def agree(group, stage="participant", key="tek", count=None):
        end = time.time() + 60
        while time.time() < end:
            st = [m.status() for m in group]
            if all(s.get("stage") == stage and s.get(key) and s.get(key) == st[0].get(key) and s.get("settled", True) and (count is None or s.get("participants") == count) for s in st):
                return time.time(), st[0][key]
            time.sleep(0.2)
        raise SystemExit(f"no agreement: {st}")
    ta, tek = agree(ms, count=N)
    print(f"controller killed: all {N} continued as participants {max(conv):.2f} s after the kill (silence bound 3 s); one TEK ({tek}) with {N} listed {ta - t0:.2f} s after", flush=True)
    t1 = time.time(); new = M(N + 1); new.wait("participant", 60); tj = time.time() - t1
    ta, tek = agree(ms + [new], count=N + 1)
    print(f"newcomer joined through a participant in {tj:.2f} s (start to grant); all {N+1} at {tek} {ta - t1:.2f} s after its start", flush=True)
    t, _ = ms[0].wait("data", 10, lambda e: "from participant" in e.get("text", ""))
    print("data under the distributed TEK read: yes", flush=True)
    t2 = time.time(); ms[0].order("evict member-2"); ms[1].wait("departed", 30); te = time.time() - t2
    live = [m for i, m in enumerate(ms) if i != 1] + [new]
    ta, tek = agree(live, count=N)
    print(f"eviction: the evicted participant out in {te:.2f} s, the other {N} at {tek} {ta - t2:.2f} s after the order; exit status {ms[1].p.wait()}", flush=True)
    t3 = time.time(); ms[3].order("leave"); ms[3].wait("left", 30); tl = time.time() - t3
    live = [m for i, m in enumerate(ms) if i not in (1, 3)] + [new]
    ta, tek = agree(live, count=N - 1)
    print(f"leave: done in {tl:.2f} s, the other {N-1} at {tek} {ta - t3:.2f} s after the order", flush=True)
    holdout = live.pop(); holdout.p.kill()
    t4 = time.time(); ms[0].order("take-back taken-back.toml"); tt, took = ms[0].wait("took_back", 60)
    print(f"take-back: {took['handed_back']} handed back, {took['removed']} removed (one participant killed), controller started {tt - t4:.2f} s after the order", flush=True)
    for m in live: m.wait("joined", 60)
    ta, key = agree(live, stage="member", key="group_key")
    print(f"all {len(live)} members at the new controller's group key {key} {ta - t4:.2f} s after the order", flush=True)


try:
    run()
finally:
    for child in children:
        child.kill()

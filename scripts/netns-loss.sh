#!/usr/bin/env bash
# keycast under real kernel packet loss, in a network namespace of its own.
#
#   scripts/netns-loss.sh demo [RATES...]        keycast demo --json at each loss rate (default 0.05 0.10 0.20)
#   scripts/netns-loss.sh processes [RATE] [SECS] a real server and 20 member processes (default 0.20, 60 s)
#
# Options (environment): KEYCAST=path/to/keycast (default: target/release/keycast, built if
# missing), LOSS_ON=all|udp (default all: TCP and UDP), DEMO_ARGS="..." (extra demo flags).
#
# Loss: this kernel may lack the netem qdisc, so a classic-BPF filter at the ingress of the
# namespace's loopback drops each packet with probability p (TC_ACT_SHOT when a random u32 is
# below p * 2^32). It drops a multicast datagram before it is copied to receivers, so all
# receivers lose the same ones. Needs root (ip netns, tc); skips with exit 0 otherwise. Every
# address used is the namespace's own loopback; the namespace is deleted on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]] || ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
    echo "netns-loss: skipped (needs root, ip and tc)"
    exit 0
fi

KEYCAST=${KEYCAST:-target/release/keycast}
if [[ ! -x $KEYCAST ]]; then
    cargo build --release --locked -p keycast
fi
KEYCAST=$(realpath "$KEYCAST")
NS=keycast-loss-$$
WORK=$(mktemp -d)
cleanup() {
    ip netns pids "$NS" 2>/dev/null | xargs -r kill 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# The BPF program: [match UDP (IP protocol 17), else pass]; draw a random u32; drop if below T.
bytecode() {
    local t
    t=$(python3 -c "print(min(int(float('$1') * 2**32), 2**32 - 1))")
    if [[ ${LOSS_ON:-all} == udp ]]; then
        # At ingress cls_bpf sees the frame from its 14-byte Ethernet header: IP protocol at 23.
        echo "6,48 0 0 23,21 0 3 17,32 0 0 4294963256,53 1 0 $t,6 0 0 2,6 0 0 0,"
    else
        echo "4,32 0 0 4294963256,53 0 1 $t,6 0 0 0,6 0 0 2,"
    fi
}

namespace() {
    ip netns del "$NS" 2>/dev/null || true
    ip netns add "$NS"
    ip -n "$NS" link set lo up
    tc -n "$NS" qdisc add dev lo clsact
    tc -n "$NS" filter add dev lo ingress bpf da bytecode "$(bytecode "$1")"
}

run_demo() {
    local rates=("$@")
    [[ ${#rates[@]} -gt 0 ]] || rates=(0.05 0.10 0.20)
    local failed=0
    for p in "${rates[@]}"; do
        namespace "$p"
        echo "== loss $p on ${LOSS_ON:-all} traffic: keycast demo --json ${DEMO_ARGS:-}" >&2
        # shellcheck disable=SC2086
        if out=$(ip netns exec "$NS" "$KEYCAST" demo --json ${DEMO_ARGS:-}); then
            echo "{\"loss\": $p, \"loss_on\": \"${LOSS_ON:-all}\", \"demo\": $out}"
            python3 - "$out" <<'EOF' || failed=1
import json, sys
s = json.loads(sys.argv[1])
ok = s["members_in_sync"] == s["members"] and not s["evicted_can_decrypt"]
print(f"   members in sync {s['members_in_sync']}/{s['members']}, evicted can decrypt: {s['evicted_can_decrypt']}: {'ok' if ok else 'FAILED'}", file=sys.stderr)
sys.exit(0 if ok else 1)
EOF
        else
            echo "   keycast demo failed at loss $p" >&2
            failed=1
        fi
    done
    return $failed
}

run_processes() {
    local p=${1:-0.20} secs=${2:-60} members=20
    namespace "$p"
    local dir=$WORK/group
    "$KEYCAST" init "$dir" --members "$members" >/dev/null
    echo "== loss $p on ${LOSS_ON:-all} traffic: a server and $members member processes for $secs s" >&2
    ip netns exec "$NS" "$KEYCAST" server --config "$dir/server.toml" 2>"$WORK/server.log" &
    sleep 1
    local pids=()
    for i in $(seq 1 "$members"); do
        ip netns exec "$NS" "$KEYCAST" member --config "$dir/member-$i.toml" --for-secs "$secs" >"$WORK/member-$i.out" 2>"$WORK/member-$i.err" &
        pids+=($!)
    done
    # Near the end, every member must be counted and at the controller's active key.
    sleep $((secs - 5))
    ip netns exec "$NS" "$KEYCAST" admin --config "$dir/admin.toml" stats >"$WORK/stats.json" 2>"$WORK/stats.err" || true
    local codes=() failed=0
    for pid in "${pids[@]}"; do
        if wait "$pid"; then codes+=(0); else codes+=($?); failed=1; fi
    done
    local evicted expired
    evicted=$( (grep -l -i "evicted" "$WORK"/member-*.out 2>/dev/null || true) | wc -l)
    expired=$(grep -c "why=Expired\|why=Evicted" "$WORK/server.log" || true)
    echo "   exit codes: ${codes[*]}" >&2
    echo "   members told they were evicted: $evicted; removals by expiry or eviction in the server log: $expired" >&2
    echo "   controller near the end: $(tr -d '\n ' <"$WORK/stats.json")" >&2
    python3 - "$WORK/stats.json" "$members" <<'EOF' || failed=1
import json, sys
try:
    s = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"   no stats from the controller: {e}", file=sys.stderr); sys.exit(1)
sys.exit(0 if s["members"] == int(sys.argv[2]) else 1)
EOF
    [[ $evicted -eq 0 && $expired -eq 0 ]] || failed=1
    echo "{\"loss\": $p, \"loss_on\": \"${LOSS_ON:-all}\", \"members\": $members, \"seconds\": $secs, \"exit_codes\": [$(IFS=,; echo "${codes[*]}")], \"told_evicted\": $evicted, \"expired_or_evicted\": $expired, \"stats\": $(cat "$WORK/stats.json" 2>/dev/null || echo null)}"
    return $failed
}

case ${1:-demo} in
    demo) shift || true; run_demo "$@" ;;
    processes) shift; run_processes "$@" ;;
    *) echo "usage: $0 demo [RATES...] | processes [RATE] [SECS]" >&2; exit 2 ;;
esac

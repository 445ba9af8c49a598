//! `keycast load-members` (hidden): the simulated members of `keycast bench --net --members`.
//! Each member is only what refreshing and resyncing over UDP need: its id, its individual key
//! (from a 0600 file the bench wrote) and its liveness counter. The bench drives it by lines
//! on stdin (`resync K`, `silence K`, `flood RATE SECONDS`, `stop`) and reads one JSON line per
//! answer on stdout.

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use keycast_core::wire::{open_resync_answer, GroupId, Liveness, LivenessKey, ResyncAnswerKey};
use keycast_core::{Key, MemberId};
use keycast_net::{entropy, now_ms};
use serde_json::json;

/// First bytes of a member key file.
const KEYS_MAGIC: &[u8; 8] = b"kcload01";
/// One entry: member id (8 bytes, big-endian) and individual key (32).
const ENTRY_LEN: usize = 8 + 32;
/// Members one simulator process accepts (2^24: far above the bench's million).
const MAX_MEMBERS: u64 = 1 << 24;
/// A resync answer not back after this long is asked again, at most `RESYNC_ATTEMPTS` times.
const RESYNC_TIMEOUT: Duration = Duration::from_millis(500);
const RESYNC_ATTEMPTS: u32 = 3;

#[derive(Args)]
pub struct SimulatedArgs {
    /// The member key file the bench wrote (0600).
    #[arg(long)]
    keys: PathBuf,
    /// The controller's UDP address (its TLS port).
    #[arg(long)]
    server: SocketAddr,
    /// Each member refreshes once in this many ms; refreshes are spread evenly over it.
    #[arg(long)]
    refresh_ms: u64,
}

/// The group and its members' ids and individual keys.
pub struct MemberKeysFile {
    pub group: GroupId,
    pub members: Vec<(MemberId, Key)>,
}

/// Writes the members' keys to `path`, readable by this user only; refuses an existing file.
pub fn write_keys(path: &Path, keys: &MemberKeysFile) -> Result<(), String> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let mut write = |bytes: &[u8]| out.write_all(bytes).map_err(|e| format!("cannot write {}: {e}", path.display()));
    write(KEYS_MAGIC)?;
    write(&keys.group.0.to_be_bytes())?;
    write(&(keys.members.len() as u64).to_be_bytes())?;
    for (member, key) in &keys.members {
        write(&member.0.to_be_bytes())?;
        write(key.as_bytes())?;
    }
    out.flush().map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Reads a key file strictly: magic, a count within bounds, exactly that many entries.
pub fn read_keys(path: &Path) -> Result<MemberKeysFile, String> {
    let mut bytes = zeroize::Zeroizing::new(Vec::new());
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    file.take(24 + MAX_MEMBERS * ENTRY_LEN as u64 + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let bad = |what: &str| format!("{} is not a member key file: {what}", path.display());
    if bytes.len() < 24 || &bytes[..8] != KEYS_MAGIC {
        return Err(bad("no header"));
    }
    let group = GroupId(u64::from_be_bytes(bytes[8..16].try_into().expect("8 bytes")));
    let count = u64::from_be_bytes(bytes[16..24].try_into().expect("8 bytes"));
    if count > MAX_MEMBERS || bytes.len() as u64 != 24 + count * ENTRY_LEN as u64 {
        return Err(bad("its length does not match its count"));
    }
    let members = bytes[24..]
        .chunks_exact(ENTRY_LEN)
        .map(|entry| {
            let member = MemberId(u64::from_be_bytes(entry[..8].try_into().expect("8 bytes")));
            (member, Key::from_bytes(entry[8..].try_into().expect("32 bytes")))
        })
        .collect();
    Ok(MemberKeysFile { group, members })
}

/// The members and what the refresh thread and the command loop share.
struct Simulation {
    group: GroupId,
    members: Vec<(MemberId, Key)>,
    /// Per member, the last liveness counter sent (it must grow).
    counters: Vec<AtomicU64>,
    /// Members at index `active` and above have stopped refreshing (they will expire).
    active: AtomicUsize,
    refreshes_sent: AtomicU64,
    send_errors: AtomicU64,
    stop: AtomicBool,
    server: SocketAddr,
}

impl Simulation {
    /// Member `index`'s next datagram: a refresh or a resync request.
    fn datagram(&self, index: usize, resync: bool) -> [u8; keycast_core::wire::LIVENESS_LEN] {
        let (member, key) = &self.members[index];
        let now = now_ms();
        // The member's clock, or one more than its last datagram's.
        let next = |previous: u64| previous.saturating_add(1).max(now);
        let previous = self.counters[index].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| Some(next(p))).unwrap_or_default();
        let counter = next(previous);
        let liveness = Liveness { group: self.group, member: *member, resync, counter, rekey_seq: 0 };
        liveness.seal(&LivenessKey::derive(key, self.group, *member))
    }

    /// Sends every refresh due since the start, `refresh_ms` apart per member and spread evenly
    /// over members, until told to stop.
    fn refresh_loop(&self, socket: &UdpSocket, refresh_ms: u64) {
        let n = self.members.len() as u64;
        let start = Instant::now();
        let mut sent_slots = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            let due = (start.elapsed().as_micros() as u64).saturating_mul(n) / (refresh_ms * 1000);
            for slot in sent_slots..due {
                let index = (slot % n) as usize;
                if index >= self.active.load(Ordering::Relaxed) {
                    continue;
                }
                match socket.send_to(&self.datagram(index, false), self.server) {
                    Ok(_) => self.refreshes_sent.fetch_add(1, Ordering::Relaxed),
                    Err(_) => self.send_errors.fetch_add(1, Ordering::Relaxed),
                };
            }
            sent_slots = sent_slots.max(due);
            // Pacing: the next refreshes fall due within the millisecond.
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// `count` resyncs over UDP from members spread over the active ones; each answer must
    /// open under the member's resync key and name the member. Returns (answered, failed).
    fn resyncs(&self, count: usize) -> Result<(u64, u64), String> {
        let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let active = self.active.load(Ordering::Relaxed).max(1);
        let (mut answered, mut failed) = (0, 0);
        let mut buf = vec![0u8; 65_536];
        for j in 0..count.min(active) {
            let index = j * active / count.min(active);
            if self.resync_one(&socket, index, &mut buf)? {
                answered += 1;
            } else {
                failed += 1;
            }
        }
        Ok((answered, failed))
    }

    /// One resync request with a deadline per attempt and jittered retries.
    fn resync_one(&self, socket: &UdpSocket, index: usize, buf: &mut [u8]) -> Result<bool, String> {
        let (member, key) = &self.members[index];
        let answer_key = ResyncAnswerKey::derive(key, self.group, *member);
        for attempt in 0..RESYNC_ATTEMPTS {
            socket.send_to(&self.datagram(index, true), self.server).map_err(|e| e.to_string())?;
            let deadline = Instant::now() + RESYNC_TIMEOUT;
            while let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
                socket.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
                let Ok((len, _)) = socket.recv_from(buf) else { break };
                if let Ok((answer, _)) = open_resync_answer(&buf[..len], &answer_key) {
                    if answer.member == *member && !answer.keys.is_empty() {
                        return Ok(true);
                    }
                }
            }
            // Jitter, so retries of many members do not fall together (and past the rate limit).
            let jitter = u64::from(entropy()[0]) % 50;
            std::thread::sleep(Duration::from_millis(keycast_core::protocol::UDP_RESYNC_INTERVAL_MS + jitter) * (attempt + 1));
        }
        Ok(false)
    }
}

/// Threads (each with its own socket) that send a flood: a datagram costs its sender about
/// 4 µs of CPU on loopback (the kernel's path to the receiving socket), so one thread has no
/// room to spare at 200,000 a second.
const FLOOD_SENDERS: u64 = 2;

impl Simulation {
    /// Forged refreshes at `per_second` for `length`: real member ids under a wrong tag and
    /// ids never issued, in turn (what an attacker without keys can send), from
    /// `FLOOD_SENDERS` threads. Returns how many were sent.
    fn flood(&self, per_second: u64, length: Duration) -> Result<u64, String> {
        let sockets = (0..FLOOD_SENDERS)
            .map(|_| {
                let socket = UdpSocket::bind("127.0.0.1:0")?;
                socket.connect(self.server)?;
                Ok(socket)
            })
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| e.to_string())?;
        let start = Instant::now();
        let sent = std::thread::scope(|s| {
            let senders: Vec<_> = sockets.iter().enumerate().map(|(t, socket)| s.spawn(move || self.flood_share(socket, t as u64, per_second, start, length))).collect();
            senders.into_iter().map(|sender| sender.join().unwrap_or(0)).sum()
        });
        Ok(sent)
    }

    /// Datagram i of the flood for every i = `share` mod `FLOOD_SENDERS` due by now, until
    /// `length` after `start`. Returns how many it sent.
    fn flood_share(&self, socket: &UdpSocket, share: u64, per_second: u64, start: Instant, length: Duration) -> u64 {
        let n = self.members.len() as u64;
        // The forger's own key, derived once: any key but the member's gives a wrong tag.
        let forger = LivenessKey::derive(&Key::from_bytes([0x5a; 32]), self.group, MemberId(share));
        let (mut next, mut sent) = (share, 0u64);
        while start.elapsed() < length {
            let due = (start.elapsed().as_micros() as u64).saturating_mul(per_second) / 1_000_000;
            while next < due {
                let i = next;
                let member = if i % 2 == 0 { self.members[(i / 2 % n) as usize].0 } else { MemberId(u64::MAX - i) };
                let forged = Liveness { group: self.group, member, resync: false, counter: now_ms() + i, rekey_seq: 0 };
                if socket.send(&forged.seal(&forger)).is_ok() {
                    sent += 1;
                }
                next += FLOOD_SENDERS;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        sent
    }
}

/// Prints one JSON line and flushes it (the bench reads it at once).
fn answer(line: serde_json::Value) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).map_err(|e| e.to_string())
}

pub fn run(args: &SimulatedArgs) -> Result<(), String> {
    if args.refresh_ms == 0 {
        return Err("--refresh-ms must be positive".into());
    }
    let keys = read_keys(&args.keys)?;
    if keys.members.is_empty() {
        return Err("the key file holds no member".into());
    }
    let n = keys.members.len();
    let sim = Arc::new(Simulation {
        group: keys.group,
        counters: (0..n).map(|_| AtomicU64::new(0)).collect(),
        members: keys.members,
        active: AtomicUsize::new(n),
        refreshes_sent: AtomicU64::new(0),
        send_errors: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        server: args.server,
    });
    let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let refresher = {
        let (sim, refresh_ms) = (sim.clone(), args.refresh_ms);
        std::thread::spawn(move || sim.refresh_loop(&socket, refresh_ms))
    };
    answer(json!({ "ready": n }))?;
    // Commands until `stop` or the end of stdin (the bench is gone: stop too).
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| e.to_string())?;
        let mut words = line.split_whitespace();
        let (command, count) = (words.next().unwrap_or(""), words.next().and_then(|c| c.parse::<usize>().ok()).unwrap_or(0));
        match command {
            "resync" => {
                let (answered, failed) = sim.resyncs(count)?;
                answer(json!({ "resyncs_answered": answered, "resyncs_failed": failed }))?;
            }
            "silence" => {
                let active = n.saturating_sub(count);
                sim.active.store(active, Ordering::Relaxed);
                answer(json!({ "silenced": n - active }))?;
            }
            "flood" => {
                let seconds = words.next().and_then(|s| s.parse::<u64>().ok()).unwrap_or(1);
                let sent = sim.flood(count as u64, Duration::from_secs(seconds))?;
                answer(json!({ "flood_sent": sent }))?;
            }
            "stop" => break,
            other => return Err(format!("unknown command {other:?}")),
        }
    }
    sim.stop.store(true, Ordering::Relaxed);
    refresher.join().map_err(|_| "the refresh thread panicked")?;
    answer(json!({ "refreshes_sent": sim.refreshes_sent.load(Ordering::Relaxed), "send_errors": sim.send_errors.load(Ordering::Relaxed) }))
}

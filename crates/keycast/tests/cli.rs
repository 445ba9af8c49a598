//! The `keycast` binary end to end.

use std::process::Command;

fn keycast(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_keycast")).args(args).output().expect("run keycast");
    assert!(out.status.success(), "keycast {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn sim_rekey_reports_the_closed_form_for_evenly_spread_leavers() {
    // d = 4, N = 4096 (h = 6), k = 16: 4*(4^3-1)/3 + 4*16*(6-2-2) + 16*3 = 260 wraps.
    let report = keycast(&["sim", "rekey", "--scheme", "tree", "--degree", "4", "--members", "4096", "--leaves", "16", "--placement", "even", "--json"]);
    assert_eq!(report["wraps"], 260);
    assert_eq!(report["members_after"], 4080);
    for field in ["changed_keys", "bytes", "micros"] {
        assert!(report[field].is_u64(), "{field} missing: {report}");
    }
    assert!(report["bytes"].as_u64().unwrap() > 260 * 48, "bytes must cover the sealed keys");
}

#[test]
fn sim_rekey_flat_leave_costs_two_entries_per_bit() {
    let report = keycast(&["sim", "rekey", "--scheme", "flat", "--members", "1000", "--id-bits", "16", "--leaves", "1", "--json"]);
    assert_eq!(report["wraps"], 32);
}

#[test]
fn sim_rejects_impossible_batches_with_a_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_keycast"))
        .args(["sim", "rekey", "--members", "10", "--leaves", "11"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exceeds"));
}

#[test]
fn demo_keeps_members_in_sync_and_the_evicted_member_out() {
    let summary = keycast(&["demo", "--json"]);
    assert_eq!(summary["epochs"], 6);
    assert_eq!(summary["members_in_sync"], summary["members"]);
    assert!(summary["members"].as_u64().unwrap() > 100);
    assert_eq!(summary["evicted_can_decrypt"], false);
    assert!(summary["rekey_bytes"].as_u64().unwrap() > 0);
}

/// `init`, `server`, `member` and `admin` as separate processes, as the README shows them.
#[test]
fn init_server_member_and_admin_work_together_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let bin = env!("CARGO_BIN_EXE_keycast");
    let run = |args: &[&str]| Command::new(bin).args(args).current_dir(dir.path()).output().unwrap();
    let init = run(&["init", ".", "--members", "2", "--port", &port.to_string()]);
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    assert!(!run(&["init", "."]).status.success(), "init must not overwrite a setup");

    let mut server = KillOnDrop(
        Command::new(bin)
            .args(["server", "--config", "server.toml"])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    let listener = Command::new(bin)
        .args(["member", "--config", "member-2.toml", "--for-secs", "30"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let talker = run(&["member", "--config", "member-1.toml", "--send", "3", "--interval-ms", "300", "--for-secs", "4"]);
    let talker_out = String::from_utf8_lossy(&talker.stdout).to_string();
    assert_eq!(talker.status.code(), Some(0), "{talker_out}{}", String::from_utf8_lossy(&talker.stderr));
    assert!(talker_out.contains("joined as member") && talker_out.contains("left the group"), "{talker_out}");

    // The leave takes effect with the epoch's rekey (one-second epochs).
    let mut listed = String::new();
    for _ in 0..50 {
        listed = String::from_utf8_lossy(&run(&["admin", "--config", "admin.toml", "list"]).stdout).to_string();
        if !listed.contains("member-1") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(listed.contains("member-2") && !listed.contains("member-1"), "{listed}");
    let stats: serde_json::Value = serde_json::from_slice(&run(&["admin", "--config", "admin.toml", "stats"]).stdout).unwrap();
    assert_eq!(stats["members"], 1);
    assert!(stats["rekey_bytes"].as_u64().unwrap() > 0);
    let id = listed.lines().nth(1).unwrap().split_whitespace().next().unwrap().to_string();
    let evict = run(&["admin", "--config", "admin.toml", "evict", &id]);
    assert!(String::from_utf8_lossy(&evict.stdout).contains("evicted"));

    let listened = listener.wait_with_output().unwrap();
    let heard = String::from_utf8_lossy(&listened.stdout).to_string();
    assert!(heard.contains("data: test message"), "member-2 heard no data: {heard}");
    assert!(heard.contains("Evicted"), "member-2 was not told of its eviction: {heard}");
    assert_eq!(listened.status.code(), Some(3), "an evicted member exits with status 3");
    server.0.kill().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(server.0.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(log.contains("eviction ordered"), "{log}");
}

/// A member whose controller never answers retries until its join deadline, then exits 1
/// naming the address; `--help` documents the exit statuses.
#[test]
fn member_without_a_controller_exits_1_naming_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let bin = env!("CARGO_BIN_EXE_keycast");
    let run = |args: &[&str]| Command::new(bin).args(args).current_dir(dir.path()).output().unwrap();
    assert!(run(&["init", ".", "--members", "1", "--port", &port.to_string()]).status.success());
    let config = dir.path().join("member-1.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace("join_deadline_ms = 60000", "join_deadline_ms = 1500");
    std::fs::write(&config, text).unwrap();

    let started = std::time::Instant::now();
    let out = run(&["member", "--config", "member-1.toml", "--for-secs", "5"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let addr = format!("127.0.0.1:{port}");
    assert!(stderr.contains(&format!("waiting for the controller at {addr}")), "no retry was logged: {stderr}");
    assert!(stderr.contains("gave up the join") && stderr.contains(&addr), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "the join deadline was not kept");

    let help = String::from_utf8_lossy(&run(&["member", "--help"]).stdout).to_string();
    assert!(help.contains("Exit status: 0") && help.contains("3 when the controller evicted"), "{help}");
}

/// A child process that cannot outlive a failed test.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Rows of one series of a figure's CSV (`series,x,y`), as (x, y).
fn csv_series(dir: &std::path::Path, stem: &str, series: &str) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(dir.join(format!("{stem}.csv"))).expect("csv written");
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let (name, rest) = line.rsplit_once(',').and_then(|(head, y)| head.rsplit_once(',').map(|(n, x)| (n, (x, y))))?;
            (name.trim_matches('"') == series).then(|| (rest.0.parse().unwrap(), rest.1.parse().unwrap()))
        })
        .collect()
}

#[test]
fn sim_figures_quick_writes_every_figure_with_the_papers_shapes() {
    let dir = std::env::temp_dir().join(format!("keycast-figures-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_keycast"))
        .args(["sim", "figures", "--quick", "--quiet", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let page = std::fs::read_to_string(dir.join("figures.md")).unwrap();
    let stems: Vec<&str> = page.lines().filter_map(|l| l.strip_prefix("- Data: [`")?.split('.').next()).collect();
    assert_eq!(stems.len(), 16, "one entry per figure: {stems:?}");
    for stem in &stems {
        for ext in ["csv", "svg", "png"] {
            let bytes = std::fs::read(dir.join(format!("{stem}.{ext}"))).unwrap_or_else(|_| panic!("{stem}.{ext}"));
            assert!(bytes.len() > 200, "{stem}.{ext} is nearly empty");
        }
        assert!(page.contains(&format!("]({stem}.svg)")), "figures.md shows {stem}");
    }
    assert!(std::fs::read(dir.join("fig1a_wong_time_vs_size.png")).unwrap().starts_with(b"\x89PNG"));
    assert!(!page.contains("NaN"), "every measured line has numbers");

    // Figure 1: a leave costs d·h - 1 wraps, so it grows with log n, not with n.
    let leave = csv_series(&dir, "fig1c_wong_wraps_vs_size", "leave");
    assert_eq!(leave.first().unwrap().0, 32.0);
    assert_eq!(leave.last().unwrap().0, 1024.0);
    assert!(leave.windows(2).all(|w| w[1].1 >= w[0].1), "{leave:?}");
    assert_eq!(leave.last().unwrap().1, 19.0, "4·5 - 1 wraps at n = 4^5");
    assert!(leave.last().unwrap().1 / leave[0].1 < 2.5, "32x the members, about 2x the wraps");

    // Figure 2: the fewest wraps per request (mean of join and leave) is at degree 4.
    let average = csv_series(&dir, "fig2c_wong_wraps_vs_degree", "average");
    assert_eq!(average.len(), 15);
    let best = average.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
    assert_eq!(best.0, 4.0, "{average:?}");

    // Figure 3: random leavers never cost more than evenly spread ones; the closed form (exact
    // for a full tree, see sizes.rs) is within 5% of evenly spread leavers at n = 2000.
    let random = csv_series(&dir, "fig3a_mk_entries", "d = 2, random leavers (mean of runs)");
    let even = csv_series(&dir, "fig3a_mk_entries", "d = 2, evenly spread leavers (measured)");
    let closed = csv_series(&dir, "fig3a_mk_entries", "d = 2, worst-case closed form (5.1)");
    assert!(!even.is_empty() && even.len() == closed.len());
    for ((k, e), (_, c)) in even.iter().zip(&closed) {
        let r = random.iter().find(|p| p.0 == *k).unwrap().1;
        assert!(r <= *e + 1e-9 && (e - c).abs() <= 0.05 * c, "k = {k}: random {r}, even {e}, closed form {c}");
    }
    assert!(random.last().unwrap().1 < random.iter().map(|p| p.1).fold(0.0, f64::max) / 4.0, "nearly everyone leaving prunes the tree");

    // Figure 5: flat costs 2·I = 40 entries and 2·I + 1 shared keys whatever n; a tree grows.
    let flat = csv_series(&dir, "fig5a_caronni_entries_per_leave", "flat (20-bit IDs)");
    assert!(flat.iter().all(|p| p.1 == 40.0), "{flat:?}");
    let storage = csv_series(&dir, "fig5c_caronni_storage", "flat (20-bit IDs), shared keys");
    assert!(storage.iter().all(|p| p.1 == 41.0), "{storage:?}");
    let tree = csv_series(&dir, "fig5c_caronni_storage", "tree d = 4, shared keys");
    assert!(tree.last().unwrap().1 > 10.0 * tree[0].1);

    // Figure 6: when nearly everyone leaves, a star needs fewer wraps than any tree.
    let star = csv_series(&dir, "fig6_batch_wraps_by_scheme", "star");
    let d2 = csv_series(&dir, "fig6_batch_wraps_by_scheme", "d = 2");
    assert!(star.last().unwrap().1 < d2.last().unwrap().1 && star[0].1 > d2[0].1);

    // Figure 7: batching per interval needs fewer wraps per request than rekeying each one.
    let single = csv_series(&dir, "fig7b_gsm_wraps_per_request", "star, 30 members, rekey per request");
    let batched = csv_series(&dir, "fig7b_gsm_wraps_per_request", "star, 30 members, batched per 20 s interval");
    assert!(single.iter().zip(&batched).all(|(s, b)| b.1 < s.1), "{single:?} {batched:?}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_quick_json_has_every_figure() {
    let report = keycast(&["bench", "--quick", "--json"]);
    for key in ["leave_us", "leave_floor_ratio", "batch_ms", "batch_floor_ratio", "member_us", "wrap_ns", "sign_us"] {
        assert!(report[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {report}");
    }
    assert_eq!(report["leave_wraps"], 4 * 7 - 1, "one leave from 2^14 members at d = 4");
    assert_eq!(report["batch_leavers"], (1 << 14) / 10);
    let ratio = report["mls_ratio"].as_object().expect("mls_ratio keyed by n");
    assert!(ratio.contains_key("100") && ratio.contains_key("1000"), "{report}");
    assert!(report["keycast_remove_us"]["1000"].as_f64().is_some());
}

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
        .args(["member", "--config", "member-2.toml", "--for-secs", "6"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let talker = run(&["member", "--config", "member-1.toml", "--send", "3", "--interval-ms", "300", "--for-secs", "4"]);
    let talker_out = String::from_utf8_lossy(&talker.stdout).to_string();
    assert!(talker.status.success(), "{talker_out}{}", String::from_utf8_lossy(&talker.stderr));
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

    let heard = String::from_utf8_lossy(&listener.wait_with_output().unwrap().stdout).to_string();
    assert!(heard.contains("data: test message"), "member-2 heard no data: {heard}");
    assert!(heard.contains("Evicted"), "member-2 was not told of its eviction: {heard}");
    server.0.kill().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(server.0.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(log.contains("eviction ordered"), "{log}");
}

/// A child process that cannot outlive a failed test.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

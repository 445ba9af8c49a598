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

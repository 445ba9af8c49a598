//! `keycast sim delivery` end to end, small: what the protocol must achieve, no timings.

use std::process::Command;

fn delivery(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_keycast"))
        .args(["sim", "delivery", "--json"])
        .args(args)
        .output()
        .expect("run keycast");
    assert!(out.status.success(), "keycast sim delivery {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn f(value: &serde_json::Value) -> f64 {
    value.as_f64().unwrap_or_else(|| panic!("not a number: {value}"))
}

/// Every receiver ends with its keys: recovered by multicast, or given them by unicast.
fn assert_everyone_served(report: &serde_json::Value) {
    for rekey in report["rekeys"].as_array().unwrap() {
        let receivers = f(&rekey["receivers"]);
        let last = rekey["rounds"].as_array().unwrap().last().unwrap();
        let multicast = f(&last["recovered_fraction"]) * receivers;
        assert!((multicast + f(&rekey["unicast"]) - receivers).abs() < 0.5, "{rekey}");
        assert_eq!(f(&last["naks"]), f(&rekey["unicast"]), "whoever is short after the last round gets unicast");
    }
    assert_eq!(report["summary"]["receivers_without_keys"], 0);
}

#[test]
fn fec_with_repairs_leaves_few_receivers_to_unicast() {
    let report = delivery(&["--layout", "uniform", "--members", "2000", "--loss", "0.2", "--rekeys", "8", "--seed", "3"]);
    assert_everyone_served(&report);
    let summary = &report["summary"];
    assert!(f(&summary["unicast_fraction"]) < 0.01, "{summary}");
    assert!(f(&summary["first_round_fraction"]) > 0.97, "{summary}");
    assert!(f(&summary["overhead"]) > f(&summary["overhead_floor"]), "no code beats 1/(1-p): {summary}");
    for rekey in report["rekeys"].as_array().unwrap() {
        assert!(rekey["multicast_rounds"].as_u64().unwrap() <= 2);
    }
}

#[test]
fn without_fec_or_naks_the_unicast_fraction_is_the_loss_rate() {
    let report = delivery(&[
        "--layout", "uniform", "--members", "2000", "--loss", "0.2", "--rekeys", "4", "--rho", "1", "--fixed-rho", "--multicast-rounds", "1",
    ]);
    assert_everyone_served(&report);
    for rekey in report["rekeys"].as_array().unwrap() {
        assert_eq!(f(&rekey["rho"]), 1.0);
        assert_eq!(f(&rekey["overhead"]), 1.0, "originals only");
        let unicast = f(&rekey["unicast_fraction"]);
        // Only the whole block (all k packets) could stand in for a lost own packet: never, with none lost.
        assert!((unicast - 0.2).abs() < 0.04, "unicast {unicast} is not about the 20% loss rate");
    }
}

#[test]
fn the_papers_setting_adapts_rho_toward_the_nak_target_on_a_real_key_tree() {
    let report = delivery(&["--members", "2048", "--leaves", "512", "--high-loss-fraction", "0.2", "--high-loss", "0.2", "--loss", "0.02", "--rho", "1", "--rekeys", "12"]);
    assert_everyone_served(&report);
    let rekeys = report["rekeys"].as_array().unwrap();
    assert_eq!(f(&rekeys[0]["rho"]), 1.0);
    assert!(f(&rekeys[0]["rounds"][0]["naks"]) > 40.0, "rho = 1 draws many NAKs: {}", rekeys[0]);
    let summary = &report["summary"];
    assert!(f(&summary["rho"]) > 1.2, "{summary}");
    assert!(f(&summary["first_round_naks"]) < 40.0, "NAKs come down toward the target of 20: {summary}");
    assert!(rekeys.iter().all(|r| f(&r["receivers"]) == 2048.0), "every member needs one packet of a real rekey");
}

#[test]
fn bursty_loss_and_bad_arguments() {
    let report = delivery(&["--layout", "uniform", "--members", "2000", "--loss", "0.1", "--burst", "4", "--rekeys", "6"]);
    assert_everyone_served(&report);
    let out = Command::new(env!("CARGO_BIN_EXE_keycast")).args(["sim", "delivery", "--loss", "1.5"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in [0, 1)"));
}

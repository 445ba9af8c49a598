//! `keycast admin stats` for people: what comes from the controller's log (and so survives a
//! restart) apart from the counters of this controller process.

use keycast_net::admin::Stats;

pub fn describe(s: &Stats) -> String {
    let rows: [(&str, String); 14] = [
        ("rekey bytes", s.rekey_bytes.to_string()),
        ("parity packets", format!("{} ({} bytes)", s.parity_packets, s.parity_bytes)),
        ("NAKs", format!("{} received, {} answered by {} repair packets", s.naks_received, s.naks, s.repair_packets)),
        ("joins", s.joins.to_string()),
        ("mean join latency", format!("{:.1} ms", s.mean_join_latency_ms)),
        ("resyncs over TLS", s.resyncs.to_string()),
        ("resyncs over UDP", s.udp_resyncs.to_string()),
        ("refreshes over UDP", s.liveness_accepted.to_string()),
        ("  refused", s.liveness_refused.to_string()),
        ("  dropped (busy)", s.liveness_dropped.to_string()),
        ("connections open", s.connections_open.to_string()),
        ("  closed over a cap", s.connections_over_cap.to_string()),
        ("answers timed out", s.answers_timed_out.to_string()),
        ("controller errors", s.controller_errors.to_string()),
    ];
    let mut text = format!(
        "group {}: {} members, epoch {}, key in force {}, rekeys {} (from the log: these survive restarts); rho {:.2} for the next rekey\n\
         since this controller process started (counters start at 0 on a restart):",
        s.group, s.members, s.epoch, s.active_key, s.rekeys, s.rho
    );
    for (name, value) in rows {
        text += &format!("\n  {name:<20} {value}");
    }
    text
}

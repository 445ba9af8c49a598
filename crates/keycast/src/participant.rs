//! The participant stage of `keycast member` (Caronni et al.'s figure 6,
//! docs/distributed-flat.md): a member of a flat group whose controller was lost continues as
//! a distributed flat participant from the keys it holds, admits joiners, carries out
//! evictions and leaves; a participant ordered to `take-back` collects everyone's keys,
//! starts a controller from them in this process, and every participant that handed its keys
//! back joins that controller as a member again.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use keycast_core::protocol::distributed_flat::{Appointment, Config, Directory, Event, Identity};
use keycast_core::protocol::member::FlatShares;
use keycast_core::wire::GroupId;
use keycast_core::{FlatIds, Scheme};
use keycast_net::client::MemberSetup;
use keycast_net::config::{DistributedConfig, MemberConfig, ServerConfig};
use keycast_net::distributed::{directory_entry, start_log_from, DistributedParticipant, DistributedSetup, Introducer};
use keycast_net::pki::Credentials;
use keycast_net::server::Server;
use serde_json::json;

use crate::member_events::EventLine;
use crate::member_run::Run;
use crate::net::{member_setup, server_setup, MemberEnd};
use crate::participant_data::ParticipantData;

/// How the participant stage ended.
pub(crate) enum ParticipantEnd {
    Done(MemberEnd),
    /// Handed the keys back (or took the group back): join the controller as a member.
    Rejoin(Box<MemberSetup>),
}

/// This member's participant setup from its config's `[distributed]` section.
pub(crate) fn setup(config: &MemberConfig, d: &DistributedConfig) -> Result<DistributedSetup, String> {
    let credentials = Credentials::load(&config.tls).map_err(|e| e.to_string())?;
    let mut directory = Directory::new();
    for path in &d.participants {
        let pem = std::fs::read_to_string(path).map_err(|e| format!("[distributed] participant certificate {}: {e}", path.display()))?;
        let (identity, key) = directory_entry(&pem).map_err(|e| format!("[distributed] participant certificate {}: {e}", path.display()))?;
        directory.insert(identity, key);
    }
    // Checked now, not when the controller is lost and it is too late to fix the config.
    let (own, _) = directory_entry(&credentials.cert_pem).map_err(|e| format!("this member's certificate: {e}"))?;
    if !directory.contains_key(&own) {
        return Err(format!("[distributed] participants does not list this member's own certificate ({own}): it could not continue as a participant"));
    }
    keycast_net::pki::participant_signing_seed(&credentials)
        .map_err(|e| format!("this member's key cannot sign as a participant ({e}): a participant needs an Ed25519 certificate, as `keycast init --scheme flat` issues"))?;
    let config = Config { group: GroupId(config.group), id_bits: d.id_bits, settle_ms: d.settle_ms };
    Ok(DistributedSetup { config, credentials, directory, multicast: d.multicast.clone(), presence_ms: d.presence_ms, deadline_ms: d.deadline_ms })
}

/// Joins a running distributed group through the first of `introducers` that admits this
/// member; None if none does.
pub(crate) async fn join_through(setup: &DistributedSetup, introducers: &[Introducer]) -> Option<DistributedParticipant> {
    for introducer in introducers {
        match DistributedParticipant::join(setup.clone(), introducer).await {
            Ok(participant) => return Some(participant),
            Err(error) => tracing::warn!(introducer = %introducer.identity, %error, "join through a participant failed"),
        }
    }
    None
}

pub(crate) fn controller_lost_line(silent_ms: u64, members: usize) -> EventLine {
    EventLine {
        text: format!("the controller has been silent for {:.1} s: continuing as a distributed flat participant with the keys held (a group of {members} by its last heartbeat)", silent_ms as f64 / 1000.0),
        json: json!({"event": "continuing_as_participant", "silent_ms": silent_ms, "members": members}),
    }
}

/// Continues as a participant from the member's flat shares; the handover ends once
/// `members` participants (the group by the controller's last heartbeat) are listed.
pub(crate) async fn continue_from(run: &Run, shares: FlatShares, members: usize) -> Result<DistributedParticipant, String> {
    let (setup, d) = (run.distributed.as_ref().ok_or("no [distributed] section")?, run.config.distributed.as_ref().ok_or("no [distributed] section")?);
    if shares.id_bits != d.id_bits {
        return Err(format!("the group's flat table has {} ID bits, [distributed] id_bits says {}: fix the config", shares.id_bits, d.id_bits));
    }
    // No heartbeat heard yet (the controller died right after this member joined): the
    // group's size is unknown, so the handover takes its whole window.
    let members = if members == 0 { usize::MAX } else { members };
    DistributedParticipant::from_centralized_group(setup.clone(), shares.id, shares.keys, members, d.handover_within_ms).await.map_err(|e| format!("cannot continue as a participant: {e}"))
}

/// Runs the participant until it leaves, is removed, hands its keys back or takes the group back.
pub(crate) async fn stage(run: &mut Run, mut participant: DistributedParticipant, controller: &mut Option<Server>) -> Result<ParticipantEnd, String> {
    let status = participant.status();
    run.print(EventLine {
        text: format!("participant {} of the distributed flat group ({} participants listed); orders on standard input: status, evict ID, leave, take-back SERVER-CONFIG", status.id, status.roster.len()),
        json: json!({"event": "participant", "id": status.id, "participants": status.roster.len()}),
    });
    let mut events = participant.events().ok_or("the participant's events were taken")?;
    let mut handed_back = participant.handed_back();
    let (receiver, mut data) = ParticipantData::open(&run.config, status.id)?;
    let mut buf = vec![0u8; keycast_core::wire::MAX_MESSAGE_LEN];
    let mut ticker = tokio::time::interval(Duration::from_millis(run.args.interval_ms.max(10)));
    loop {
        tokio::select! {
            received = receiver.recv_from(&mut buf) => {
                if let Some(line) = received.ok().and_then(|(len, _)| data.received(&buf[..len], &participant)) {
                    run.print(line);
                }
            }
            _ = ticker.tick(), if run.sent < run.args.send && participant.tek().is_some() => {
                run.sent += 1;
                let text = format!("test message {} from participant {}", run.sent, status.id);
                if let Err(e) = data.send(&participant, text.as_bytes()).await {
                    run.print(EventLine { text: format!("send failed: {e}"), json: json!({"event": "send_failed", "reason": e}) });
                }
            }
            Some(event) = events.recv() => {
                run.print(event_line(&event));
                match event {
                    Event::Departed { .. } => return Ok(ParticipantEnd::Done(MemberEnd::Evicted)),
                    Event::Diverged { .. } => return Err("another history of the group won after a partition: join again through one of its participants".into()),
                    Event::TekChanged(_) => {}
                }
            }
            Ok(()) = handed_back.changed() => {
                let Some(handed) = handed_back.borrow().clone() else { continue };
                run.print(EventLine {
                    text: format!("handed the keys back to {}, appointed to take the group back; joining the controller at {}", handed.collector, handed.appointment.controller),
                    json: json!({"event": "handed_back", "collector": handed.collector.as_str(), "controller": handed.appointment.controller.to_string()}),
                });
                return rejoin(run, &handed.appointment).map(|setup| ParticipantEnd::Rejoin(Box::new(setup)));
            }
            Some(order) = run.orders.recv() => {
                let mut words = order.split_whitespace();
                match (words.next(), words.next(), words.next()) {
                    (Some("status"), None, _) => run.print(status_line(&participant)),
                    (Some("evict"), Some(target), None) => {
                        let line = evict(&participant, target).await;
                        run.print(line);
                    }
                    (Some("leave"), None, _) => return leave(run, &participant, &mut events).await,
                    (Some("take-back"), Some(path), None) => match take_back(run, &participant, Path::new(path)).await {
                        Ok((server, appointment)) => {
                            *controller = Some(server);
                            return rejoin(run, &appointment).map(|setup| ParticipantEnd::Rejoin(Box::new(setup)));
                        }
                        Err(error) => run.print(failed("take-back", &error)),
                    },
                    _ => run.print(unknown_order(&order, "a participant takes: status, evict ID-OR-IDENTITY, leave, take-back SERVER-CONFIG")),
                }
            }
            _ = &mut run.stop => return leave(run, &participant, &mut events).await,
            _ = tokio::signal::ctrl_c() => return leave(run, &participant, &mut events).await,
        }
    }
}

fn event_line(event: &Event) -> EventLine {
    match event {
        Event::TekChanged(tek) => EventLine { text: format!("TEK {tek} in force"), json: json!({"event": "tek", "tek": tek.to_string()}) },
        Event::Departed { tek_version } => EventLine {
            text: format!("removed from the distributed group (TEK version {tek_version} shuts this participant out)"),
            json: json!({"event": "departed", "tek_version": tek_version}),
        },
        Event::Diverged { .. } => EventLine {
            text: "another history of the group ranks above this participant's: it stops".into(),
            json: json!({"event": "diverged"}),
        },
    }
}

fn status_line(participant: &DistributedParticipant) -> EventLine {
    let status = participant.status();
    let tek = status.tek.map(|t| t.to_string());
    EventLine {
        text: format!("participant {}: TEK {}, {} participants, {}", status.id, tek.as_deref().unwrap_or("none"), status.roster.len(), if status.settled { "settled" } else { "a change is settling" }),
        json: json!({"event": "status", "stage": "participant", "id": status.id, "tek": tek, "participants": status.roster.len(), "settled": status.settled}),
    }
}

/// Evicts the participant `target` (its flat ID, or its identity).
async fn evict(participant: &DistributedParticipant, target: &str) -> EventLine {
    let roster = participant.status().roster;
    let id = target.parse::<u64>().ok().or_else(|| roster.iter().find(|(_, who)| who.as_str() == target).map(|(id, _)| *id));
    let Some(id) = id.filter(|id| roster.contains_key(id)) else {
        return failed("evict", &format!("{target} is not a live participant"));
    };
    match participant.evict(id).await {
        Ok(()) => EventLine { text: format!("evicting participant {id} ({})", roster[&id]), json: json!({"event": "evicting", "id": id, "identity": roster[&id].as_str()}) },
        Err(error) => failed("evict", &error.to_string()),
    }
}

/// Asks to leave and waits (up to the deadline) for the exclusion that removes this participant.
async fn leave(run: &Run, participant: &DistributedParticipant, events: &mut tokio::sync::mpsc::Receiver<Event>) -> Result<ParticipantEnd, String> {
    if participant.status().roster.len() <= 1 {
        // Nobody is left to exclude it: the group ends with it.
        run.print(EventLine { text: "left: this was the last participant; the group ends".into(), json: json!({"event": "left", "last": true}) });
        return Ok(ParticipantEnd::Done(MemberEnd::Left));
    }
    participant.leave().await.map_err(|e| format!("leave: {e}"))?;
    let deadline = Duration::from_millis(run.distributed.as_ref().map_or(10_000, |d| d.deadline_ms));
    let removed = tokio::time::timeout(deadline, async {
        while let Some(event) = events.recv().await {
            if matches!(event, Event::Departed { .. }) {
                return true;
            }
        }
        false
    });
    match removed.await {
        Ok(true) => {
            run.print(EventLine { text: "left the distributed group".into(), json: json!({"event": "left"}) });
            Ok(ParticipantEnd::Done(MemberEnd::Left))
        }
        _ => Err("leave: no participant carried out the exclusion before the deadline".into()),
    }
}

/// Appointed by the operator: collects every participant's keys, writes them as the first
/// record of the new controller's log (SERVER-CONFIG's, which must not exist yet) and starts
/// that controller here. Returns it and the appointment the others follow.
async fn take_back(run: &Run, participant: &DistributedParticipant, path: &Path) -> Result<(Server, Appointment), String> {
    let d = run.config.distributed.as_ref().ok_or("no [distributed] section")?;
    let config = ServerConfig::load(path).map_err(|e| e.to_string())?;
    if config.database.exists() {
        return Err(format!("{} exists: the controller that takes the group back starts a new log", config.database.display()));
    }
    if config.group != run.config.group {
        return Err(format!("{} is the config of group {}, not of group {}", path.display(), config.group, run.config.group));
    }
    let mut setup = server_setup(&config)?;
    match setup.policy.graph.scheme {
        Scheme::Flat { id_bits, .. } if id_bits == d.id_bits => setup.policy.graph.scheme = Scheme::Flat { id_bits, ids: FlatIds::FromMemberId },
        _ => return Err(format!("{} must say scheme = \"flat\" and flat_id_bits = {} (the participants' table)", path.display(), d.id_bits)),
    }
    let SocketAddr::V4(listen) = config.listen else { return Err("the controller that takes the group back listens on IPv4".into()) };
    let server_name = Identity::new(&run.config.server_name).map_err(|e| format!("server_name: {e}"))?;
    let appointment = Appointment { group: GroupId(config.group), controller: listen, server_name, multicast: config.multicast.address };
    let within = Duration::from_millis(d.handover_within_ms);
    let handback = participant.take_back(&appointment, within, setup.policy.graph.join_policy).await.map_err(|e| e.to_string())?;
    let members = start_log_from(&handback, &setup.policy, &setup.database, setup.database_key.clone()).map_err(|e| e.to_string())?;
    setup.acl.extend(members.iter().map(|(_, who)| who.clone()));
    let server = Server::start(setup).await.map_err(|e| format!("the controller did not start: {e}"))?;
    run.print(EventLine {
        text: format!(
            "took the group back: {} participants handed their keys back ({} did not and are out); controller of group {} on {}",
            members.len(),
            handback.removed.len(),
            config.group,
            server.addr
        ),
        json: json!({"event": "took_back", "handed_back": members.len(), "removed": handback.removed.len(), "controller": server.addr.to_string()}),
    });
    Ok((server, appointment))
}

/// The member setup that joins the controller `appointment` names (its address, name and
/// multicast channel replace the config's from now on).
fn rejoin(run: &mut Run, appointment: &Appointment) -> Result<MemberSetup, String> {
    run.config.server = SocketAddr::V4(appointment.controller);
    run.config.server_name = appointment.server_name.as_str().to_owned();
    run.config.multicast.address = appointment.multicast;
    member_setup(&run.config)
}

/// Waits until the controller taking the group back accepts connections (it listens only once
/// its collection ends, seconds later), probing every `PROBE_MS`, for at most `within`: the
/// join then goes at once instead of after the join's long backoff. A probe connects and
/// closes; nothing is sent.
pub(crate) async fn until_listening(controller: SocketAddr, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        let probe = tokio::time::timeout(Duration::from_millis(PROBE_MS), tokio::net::TcpStream::connect(controller));
        if let Ok(Ok(_)) = probe.await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(PROBE_MS)).await;
    }
}

const PROBE_MS: u64 = 100;

fn failed(order: &str, reason: &str) -> EventLine {
    EventLine { text: format!("{order} failed: {reason}"), json: json!({"event": "order_failed", "order": order, "reason": reason}) }
}

pub(crate) fn unknown_order(order: &str, known: &str) -> EventLine {
    EventLine { text: format!("unknown order {order:?}: {known}"), json: json!({"event": "unknown_order", "order": order}) }
}

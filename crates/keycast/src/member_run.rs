//! `keycast member`: a member of a group under its controller and, with a `[distributed]`
//! section in its config, a distributed flat participant once the controller is lost
//! (Caronni et al.'s figure 6, docs/distributed-flat.md), back to a member when a participant
//! appointed to take the group back asks for its keys. The process moves between the two
//! stages; what it prints and its orders (lines on standard input) stay the same.

use std::path::PathBuf;
use std::time::Duration;

use keycast_core::protocol::member::FlatShares;
use keycast_core::protocol::MemberEvent;
use keycast_net::client::{ClientEvent, MemberClient, MemberSetup};
use keycast_net::config::MemberConfig;
use keycast_net::distributed::{find_introducers, DistributedParticipant, DistributedSetup};
use keycast_net::server::Server;
use serde_json::json;
use tokio::sync::mpsc;

use crate::member_events::{EventLine, EventPrinter};
use crate::net::{logging, member_setup, runtime, MemberEnd};
use crate::participant::{self, ParticipantEnd};

#[derive(clap::Args, Clone)]
pub struct MemberArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// Send this many test messages to the group, one per interval.
    #[arg(long, default_value_t = 0)]
    pub send: u32,
    #[arg(long = "interval-ms", default_value_t = 1000)]
    pub interval_ms: u64,
    /// Leave the group and stop after this many seconds (default: run until Ctrl-C).
    #[arg(long = "for-secs")]
    pub for_secs: Option<u64>,
    /// One JSON object per event and line (`"event": "joined"`, `"rekeyed"`, `"data"`, ...)
    /// instead of plain words.
    #[arg(long)]
    pub json: bool,
}

/// What the process is now.
pub(crate) enum Stage {
    Member(MemberClient, mpsc::Receiver<ClientEvent>),
    Participant(DistributedParticipant),
}

/// What the whole run shares across its stages.
pub(crate) struct Run {
    pub args: MemberArgs,
    pub config: MemberConfig,
    pub distributed: Option<DistributedSetup>,
    pub orders: mpsc::Receiver<String>,
    pub stop: std::pin::Pin<Box<tokio::time::Sleep>>,
    pub sent: u32,
}

impl Run {
    pub fn print(&self, line: EventLine) {
        println!("{}", if self.args.json { line.json.to_string() } else { line.text });
    }
}

/// How the member stage ended.
enum MemberStageEnd {
    Done(MemberEnd),
    /// The controller stayed silent `after_silence_ms`: continue as a participant with these
    /// keys, in a group of this size (by the controller's last heartbeat).
    ControllerLost(FlatShares, usize),
}

pub fn member(args: &MemberArgs) -> Result<MemberEnd, String> {
    logging();
    let config = MemberConfig::load(&args.config).map_err(|e| e.to_string())?;
    let setup = member_setup(&config)?;
    let distributed = config.distributed.as_ref().map(|d| participant::setup(&config, d)).transpose()?;
    runtime()?.block_on(async {
        let stop = Box::pin(tokio::time::sleep(Duration::from_secs(args.for_secs.unwrap_or(u64::MAX / 4))));
        let orders = if distributed.is_some() { read_orders() } else { mpsc::channel(1).1 };
        let mut run = Run { args: args.clone(), config, distributed, orders, stop, sent: 0 };
        // The controller this process started after taking the group back (kept running).
        let mut controller: Option<Server> = None;
        let mut stage = first_stage(&run, setup).await?;
        loop {
            stage = match stage {
                Stage::Member(client, events) => match member_stage(&mut run, client, events, &controller).await? {
                    MemberStageEnd::Done(end) => return Ok(end),
                    MemberStageEnd::ControllerLost(shares, size) => Stage::Participant(participant::continue_from(&run, shares, size).await?),
                },
                Stage::Participant(p) => match participant::stage(&mut run, p, &mut controller).await? {
                    ParticipantEnd::Done(end) => return Ok(end),
                    ParticipantEnd::Rejoin(setup) => {
                        let wait = run.config.distributed.as_ref().map_or(0, |d| d.handover_within_ms + d.deadline_ms);
                        participant::until_listening(setup.server, Duration::from_millis(wait)).await;
                        let (client, events) = MemberClient::join(*setup).await.map_err(|e| format!("cannot join the new controller: {e}"))?;
                        Stage::Member(client, events)
                    }
                },
            };
        }
    })
}

/// Joins the controller; with `[distributed]`, listens meanwhile for the presences of a
/// running distributed group (its controller is lost) and joins through a participant if
/// one is heard.
async fn first_stage(run: &Run, setup: MemberSetup) -> Result<Stage, String> {
    let group = run.config.group;
    let join = MemberClient::join(setup);
    let Some(distributed) = &run.distributed else {
        let (client, events) = join.await.map_err(|e| format!("cannot join group {group} at {}: {e}", run.config.server))?;
        return Ok(Stage::Member(client, events));
    };
    tokio::pin!(join);
    let listen = Duration::from_millis(distributed.presence_ms * 3);
    loop {
        tokio::select! {
            joined = &mut join => {
                let (client, events) = joined.map_err(|e| format!("cannot join group {group} at {} (and no participant of a distributed group was heard): {e}", run.config.server))?;
                return Ok(Stage::Member(client, events));
            }
            found = find_introducers(distributed, listen) => {
                let introducers = found.map_err(|e| e.to_string())?;
                if let Some(participant) = participant::join_through(distributed, &introducers).await {
                    return Ok(Stage::Participant(participant));
                }
            }
        }
    }
}

/// The member under its controller: prints events, sends `--send` messages, leaves at the
/// end; with `[distributed]`, ends when the controller has been silent `after_silence_ms` and
/// the group is flat.
async fn member_stage(run: &mut Run, client: MemberClient, mut events: mpsc::Receiver<ClientEvent>, controller: &Option<Server>) -> Result<MemberStageEnd, String> {
    let mut printer = EventPrinter::default();
    let rejoin = run.config.rejoin;
    let mut ticker = tokio::time::interval(Duration::from_millis(run.args.interval_ms.max(10)));
    let mut silence = tokio::time::interval(Duration::from_millis(250));
    let after_silence_ms = run.config.distributed.as_ref().map(|d| d.after_silence_ms);
    let mut told_tree = false;
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(event) => {
                    run.print(printer.line(&event, client.epoch()));
                    if !rejoin && event == ClientEvent::Member(MemberEvent::Evicted) {
                        return Ok(MemberStageEnd::Done(MemberEnd::Evicted));
                    }
                }
                // The client stops only once evicted for good (its rejoin failed).
                None => return Ok(MemberStageEnd::Done(MemberEnd::Evicted)),
            },
            _ = ticker.tick(), if run.sent < run.args.send && client.getkey().is_some() => {
                run.sent += 1;
                let text = format!("test message {} from member {}", run.sent, client.member().0);
                if let Err(e) = client.send(text.as_bytes()).await {
                    run.print(EventLine { text: format!("send failed: {e}"), json: json!({"event": "send_failed", "reason": e.to_string()}) });
                }
            }
            _ = silence.tick(), if after_silence_ms.is_some() => {
                let silent_ms = keycast_net::now_ms().saturating_sub(client.last_heard_ms());
                if after_silence_ms.is_some_and(|after| silent_ms >= after) {
                    if let Some(shares) = client.flat_shares() {
                        let members = client.group_size() as usize;
                        run.print(participant::controller_lost_line(silent_ms, members));
                        return Ok(MemberStageEnd::ControllerLost(shares, members));
                    }
                    if !std::mem::replace(&mut told_tree, true) {
                        tracing::warn!(silent_ms, "the controller is silent, and the group is not a flat table: it cannot go on without its controller; waiting for it");
                    }
                }
            }
            Some(order) = run.orders.recv() => run.print(member_order(&order, &client)),
            reason = stopped(controller) => return Err(format!("the controller this member started when it took the group back stopped: {reason}")),
            _ = &mut run.stop => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    client.leave().await.map_err(|e| format!("leave: {e}"))?;
    run.print(EventLine { text: "left the group".into(), json: json!({"event": "left"}) });
    Ok(MemberStageEnd::Done(MemberEnd::Left))
}

/// Why the controller this process runs stopped; pending forever if it runs none.
async fn stopped(controller: &Option<Server>) -> String {
    match controller {
        Some(server) => server.stopped().await,
        None => std::future::pending().await,
    }
}

/// A member takes one order: `status` (its group key).
fn member_order(order: &str, client: &MemberClient) -> EventLine {
    match order.trim() {
        "status" => {
            let key = client.getkey().map(|(r, _)| r.to_string());
            EventLine {
                text: format!("member {} of the controller at {}; group key {}", client.member().0, client.controller(), key.as_deref().unwrap_or("none yet")),
                json: json!({"event": "status", "stage": "member", "member": client.member().0, "group_key": key}),
            }
        }
        other => participant::unknown_order(other, "a member under its controller takes: status"),
    }
}

/// Lines of standard input, as orders, read on a thread of their own (a blocking read must
/// not keep the runtime from stopping); none if standard input is closed.
fn read_orders() -> mpsc::Receiver<String> {
    let (sender, orders) = mpsc::channel(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { return };
            if !line.trim().is_empty() && sender.blocking_send(line).is_err() {
                return;
            }
        }
    });
    orders
}

//! `keycast admin tree`: the hierarchy of relays and their subgroup sizes. The top controller
//! and every subgroup controller listed in the admin config are asked for their stats at once;
//! each relay's controller reports its membership of its parent group, and the tree is built
//! from those reports (not from the config's order), so nested relays land where they are.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keycast_net::admin::{self, AdminRequest, AdminResponse, Stats};
use keycast_net::config::AdminConfig;
use keycast_net::tls::ClientConfig;
use serde_json::{json, Value};

/// A controller that does not answer within this is listed as not answering (a standby that
/// has not taken over refuses connections at once; a hung one must not hold the command).
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// One controller asked: the top one (no name) or a configured subgroup's.
pub struct Answer {
    name: Option<String>,
    server: SocketAddr,
    stats: Result<Stats, String>,
}

pub async fn gather(config: &AdminConfig, tls: Arc<ClientConfig>) -> Vec<Answer> {
    let top = (None, config.server, config.server_name.clone());
    let subgroups = config.relays.iter().map(|r| (Some(r.name.clone()), r.server, r.server_name.clone()));
    let targets: Vec<(Option<String>, SocketAddr, String)> = std::iter::once(top).chain(subgroups).collect();
    let mut asks = tokio::task::JoinSet::new();
    for (i, (_, server, server_name)) in targets.iter().cloned().enumerate() {
        let tls = tls.clone();
        asks.spawn(async move { (i, ask(server, &server_name, tls).await) });
    }
    // In the config's order, the top first; a task that failed leaves its controller's error.
    let mut stats: Vec<Result<Stats, String>> = targets.iter().map(|_| Err("its request task failed".into())).collect();
    while let Some(done) = asks.join_next().await {
        if let Ok((i, answer)) = done {
            stats[i] = answer;
        }
    }
    targets.into_iter().zip(stats).map(|((name, server, _), stats)| Answer { name, server, stats }).collect()
}

async fn ask(server: SocketAddr, server_name: &str, tls: Arc<ClientConfig>) -> Result<Stats, String> {
    match tokio::time::timeout(ASK_TIMEOUT, admin::request(server, server_name, tls, &AdminRequest::Stats)).await {
        Ok(Ok(AdminResponse::Stats(stats))) => Ok(stats),
        Ok(Ok(AdminResponse::Error(e))) => Err(e),
        Ok(Ok(_)) => Err("answered something other than its stats".into()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer within {} s", ASK_TIMEOUT.as_secs())),
    }
}

/// The tree as JSON: the top group with its `subgroups` (recursively), then the controllers
/// that did not answer and the subgroups whose parent group did not answer.
pub fn to_json(answers: &[Answer]) -> Value {
    let top = &answers[0];
    let root = match &top.stats {
        Ok(stats) => node_json(top, stats, answers, &mut vec![stats.group]),
        Err(e) => json!({ "server": top.server.to_string(), "error": e }),
    };
    let placed = placed_groups(answers);
    let orphans: Vec<Value> = answers[1..]
        .iter()
        .filter_map(|a| a.stats.as_ref().ok().filter(|s| !placed.contains(&s.group)).map(|s| node_json(a, s, answers, &mut vec![s.group])))
        .collect();
    let silent: Vec<Value> = answers
        .iter()
        .filter_map(|a| a.stats.as_ref().err().map(|e| json!({ "name": a.name, "server": a.server.to_string(), "error": e })))
        .collect();
    json!({ "top": root, "not_answering": silent, "unplaced": orphans })
}

/// `answer`'s group and, below it, every answered group whose parent it is. `path` holds the
/// groups above, so a misreported cycle ends instead of recursing forever.
fn node_json(answer: &Answer, stats: &Stats, answers: &[Answer], path: &mut Vec<u64>) -> Value {
    let mut subgroups = Vec::new();
    for (child, child_stats) in children(stats.group, answers) {
        if path.contains(&child_stats.group) {
            continue;
        }
        path.push(child_stats.group);
        subgroups.push(node_json(child, child_stats, answers, path));
        path.pop();
    }
    json!({
        "name": answer.name,
        "group": stats.group,
        "server": answer.server.to_string(),
        "members": stats.members,
        "epoch": stats.epoch,
        "rekeys": stats.rekeys,
        "member_in_parent": stats.parent.map(|p| p.member),
        "subgroups": subgroups,
    })
}

/// The answered subgroups whose relay reports `group` as its parent, in config order.
fn children(group: u64, answers: &[Answer]) -> impl Iterator<Item = (&Answer, &Stats)> {
    answers[1..].iter().filter_map(move |a| a.stats.as_ref().ok().filter(|s| s.parent.is_some_and(|p| p.group == group)).map(|s| (a, s)))
}

/// Groups reachable from the top through parent reports.
fn placed_groups(answers: &[Answer]) -> Vec<u64> {
    let Ok(top) = &answers[0].stats else { return Vec::new() };
    let mut placed = vec![top.group];
    let mut i = 0;
    while i < placed.len() {
        let below: Vec<u64> = children(placed[i], answers).map(|(_, s)| s.group).filter(|g| !placed.contains(g)).collect();
        placed.extend(below);
        i += 1;
    }
    placed
}

/// The tree for the operator, one group per line.
pub fn describe(answers: &[Answer]) -> String {
    let tree = to_json(answers);
    let mut out = String::new();
    match tree["top"].get("group") {
        Some(_) => render(&tree["top"], "", "", &mut out),
        None => out += &format!("top controller at {}: {}\n", tree["top"]["server"], tree["top"]["error"]),
    }
    for orphan in tree["unplaced"].as_array().into_iter().flatten() {
        out += "reporting a parent group that did not answer:\n";
        render(orphan, "", "", &mut out);
    }
    for silent in tree["not_answering"].as_array().into_iter().flatten() {
        let name = silent["name"].as_str().map(|n| format!("{n} ")).unwrap_or_default();
        out += &format!("not answering: {name}at {}: {} (a standby answers only once it has taken over)\n", silent["server"].as_str().unwrap_or("?"), silent["error"].as_str().unwrap_or("?"));
    }
    out.trim_end().to_string()
}

fn render(node: &Value, first: &str, rest: &str, out: &mut String) {
    let members = node["members"].as_u64().unwrap_or(0);
    let role = match (node["name"].as_str(), node["member_in_parent"].as_u64()) {
        (Some(name), Some(member)) => format!("relay {name}, member {member} of its parent"),
        (Some(name), None) => format!("{name}, no parent reported"),
        (None, _) => "top".to_string(),
    };
    out.push_str(&format!(
        "{first}group {} at {} ({role}): {members} member{}, epoch {}, {} rekeys\n",
        node["group"],
        node["server"].as_str().unwrap_or("?"),
        if members == 1 { "" } else { "s" },
        node["epoch"],
        node["rekeys"]
    ));
    let children = node["subgroups"].as_array().cloned().unwrap_or_default();
    for (i, child) in children.iter().enumerate() {
        let last = i + 1 == children.len();
        let (branch, indent) = if last { ("└─ ", "   ") } else { ("├─ ", "│  ") };
        render(child, &format!("{rest}{branch}"), &format!("{rest}{indent}"), out);
    }
}

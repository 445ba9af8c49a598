//! The controller's status page, served on the metrics address beside the Prometheus text:
//! `/` is a small HTML page that polls `/status.json` (group size, epoch, key in force, recent
//! rekeys, one page of members); any other path answers the metrics, as before.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Mutex;

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::admin::{MemberRow, Stats};

/// Rekeys kept for the page's chart.
const RECENT_REKEYS: usize = 60;
/// Members per page of the members table.
pub const MEMBERS_PER_PAGE: usize = 50;

/// One rekey as the chart shows it.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct RekeyPoint {
    pub seq: u64,
    pub epoch: u64,
    pub bytes: u64,
    /// Members once the rekey's batch was applied.
    pub members: u64,
}

/// The last `RECENT_REKEYS` rekeys, shared between the controller task and the page.
#[derive(Default)]
pub struct RecentRekeys(Mutex<VecDeque<RekeyPoint>>);

impl RecentRekeys {
    pub fn push(&self, point: RekeyPoint) {
        let mut recent = crate::lock(&self.0);
        if recent.len() == RECENT_REKEYS {
            recent.pop_front();
        }
        recent.push_back(point);
    }

    pub fn list(&self) -> Vec<RekeyPoint> {
        crate::lock(&self.0).iter().copied().collect()
    }
}

/// What an HTTP request on the metrics address asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Page,
    Status { page: usize },
    Metrics,
}

/// Reads the request line (`GET /status.json?page=2 HTTP/1.1`); whatever is not the page or
/// its JSON gets the metrics, so a scraper may use any path.
pub fn route(request: &[u8]) -> Route {
    let line = request.split(|&b| b == b'\r' || b == b'\n').next().unwrap_or_default();
    let target = std::str::from_utf8(line).unwrap_or_default().split(' ').nth(1).unwrap_or("/metrics");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match path {
        "/" | "/status" => Route::Page,
        "/status.json" => {
            let page = query.split('&').find_map(|pair| pair.strip_prefix("page=")).and_then(|p| p.parse().ok()).unwrap_or(0);
            Route::Status { page }
        }
        _ => Route::Metrics,
    }
}

/// Reads a request's head into `head`, up to its blank line (8 KB at most): a client may send
/// it in pieces, and an answer to the first piece alone would route it wrongly.
pub async fn read_head(tcp: &mut (impl AsyncRead + Unpin), head: &mut Vec<u8>) {
    let mut buf = [0u8; 1024];
    while head.len() < 8192 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
}

#[derive(Serialize)]
struct MemberPage {
    page: usize,
    pages: usize,
    per_page: usize,
    rows: Vec<MemberRow>,
}

#[derive(Serialize)]
struct Status<'a> {
    #[serde(flatten)]
    stats: &'a Stats,
    recent_rekeys: Vec<RekeyPoint>,
    member_page: MemberPage,
}

/// The status as JSON: the stats, the recent rekeys and page `page` of the members by id.
pub fn status_json(stats: &Stats, recent_rekeys: Vec<RekeyPoint>, mut members: Vec<MemberRow>, page: usize) -> String {
    members.sort_by_key(|row| row.member);
    let pages = members.len().div_ceil(MEMBERS_PER_PAGE).max(1);
    let page = page.min(pages - 1);
    let rows = members.into_iter().skip(page * MEMBERS_PER_PAGE).take(MEMBERS_PER_PAGE).collect();
    let status = Status { stats, recent_rekeys, member_page: MemberPage { page, pages, per_page: MEMBERS_PER_PAGE, rows } };
    serde_json::to_string(&status).expect("plain values")
}

/// The answer to one request: content type and body. `members` is asked only for the JSON.
pub async fn answer<F: Future<Output = Vec<MemberRow>>>(
    request: &[u8],
    stats: Stats,
    recent: &RecentRekeys,
    members: impl FnOnce() -> F,
    metrics: impl FnOnce(&Stats) -> String,
) -> (&'static str, String) {
    match route(request) {
        Route::Page => ("text/html; charset=utf-8", PAGE.to_string()),
        Route::Status { page } => ("application/json", status_json(&stats, recent.list(), members().await, page)),
        Route::Metrics => ("text/plain; version=0.0.4", metrics(&stats)),
    }
}

const PAGE: &str = include_str!("status.html");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_the_page_its_json_and_anything_else_to_the_metrics() {
        assert_eq!(route(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Route::Page);
        assert_eq!(route(b"GET /status.json?page=3 HTTP/1.1\r\n"), Route::Status { page: 3 });
        assert_eq!(route(b"GET /status.json HTTP/1.0\r\n"), Route::Status { page: 0 });
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\n"), Route::Metrics);
        assert_eq!(route(b"\xff garbage"), Route::Metrics);
    }

    #[test]
    fn members_are_paged_by_id_and_rekeys_kept_to_the_last_sixty() {
        let members = (0..120).rev().map(|i| MemberRow { member: i, identity: format!("member-{i}"), last_seen_ms: 0, idle_ms: 0 }).collect();
        let json: serde_json::Value = serde_json::from_str(&status_json(&Stats::default(), Vec::new(), members, 2)).unwrap();
        assert_eq!(json["member_page"]["pages"], 3);
        assert_eq!(json["member_page"]["rows"][0]["member"], 100);
        assert_eq!(json["member_page"]["rows"].as_array().unwrap().len(), 20);
        let recent = RecentRekeys::default();
        for seq in 0..100 {
            recent.push(RekeyPoint { seq, epoch: seq, bytes: 1, members: 1 });
        }
        let list = recent.list();
        assert_eq!((list.len(), list[0].seq), (RECENT_REKEYS, 40));
    }
}

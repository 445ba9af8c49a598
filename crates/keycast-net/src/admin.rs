//! Administration over the authenticated TLS channel: `keycast admin list|evict|stats`.
//! Requests and answers are JSON in a frame whose first two bytes are the wire version and
//! type 0x80; only identities listed as admins are served.

use serde::{Deserialize, Serialize};

pub const ADMIN_TYPE: u8 = 0x80;
/// Largest admin request accepted.
pub const MAX_ADMIN_REQUEST: usize = 1024;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum AdminRequest {
    List,
    Evict { member: u64 },
    Stats,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberRow {
    pub member: u64,
    pub identity: String,
    pub last_seen_ms: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    pub group: u64,
    pub members: usize,
    pub epoch: u64,
    pub rekeys: u64,
    pub rekey_bytes: u64,
    pub joins: u64,
    pub mean_join_latency_ms: f64,
    /// The group key in force, as "id v version r revision".
    pub active_key: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum AdminResponse {
    Members(Vec<MemberRow>),
    Evicted { member: u64, found: bool },
    Stats(Stats),
    Error(String),
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![keycast_core::wire::WIRE_VERSION, ADMIN_TYPE];
    out.extend(serde_json::to_vec(value).expect("plain values"));
    out
}

pub fn decode<T: for<'de> Deserialize<'de>>(frame: &[u8]) -> Result<T, String> {
    match frame {
        [version, ADMIN_TYPE, body @ ..] if *version == keycast_core::wire::WIRE_VERSION && body.len() <= 1 << 20 => {
            serde_json::from_slice(body).map_err(|e| format!("bad admin message: {e}"))
        }
        _ => Err("not an admin message".into()),
    }
}

pub fn is_admin_frame(frame: &[u8]) -> bool {
    frame.len() >= 2 && frame[1] == ADMIN_TYPE
}

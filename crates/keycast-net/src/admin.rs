//! Administration over the authenticated TLS channel: `keycast admin list|evict|stats`.
//! Requests and answers are JSON in a frame whose first two bytes are the wire version and
//! type 0x80; only certificates whose fingerprints are listed as admins are served.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::tls::{read_frame, write_frame, ServerName, TlsConnector};

pub const ADMIN_TYPE: u8 = 0x80;
/// Largest admin request accepted.
pub const MAX_ADMIN_REQUEST: usize = 1024;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum AdminRequest {
    List,
    /// Removes a member at once and revokes its identity (until `Readmit`).
    Evict { member: u64 },
    /// Revokes an identity, evicting its member if it has one.
    Revoke { identity: String },
    /// Lets a revoked identity join again.
    Readmit { identity: String },
    AclAdd { identity: String },
    /// Takes an identity out of the ACL; its member, if any, is removed at once.
    AclRemove { identity: String },
    /// The ACL in force and the revoked identities.
    AclList,
    Stats,
    /// Replaces the controller's signing key; members follow the signed announcement.
    RotateSigningKey,
    /// Caronni et al.'s flat <-> tree switch (docs/distributed-flat.md): to a tree derived from
    /// the flat table (`flat_id_bits` none), or to a fresh flat table of `flat_id_bits`.
    Transition { flat_id_bits: Option<u8> },
    /// Merge, from an administrator to the absorbing controller: absorb the group whose
    /// controller listens at `server` (proving `server_name`). The absorbing controller takes
    /// the other's state itself, as its merge peer (docs/merge.md): no key passes through the
    /// administrator.
    AbsorbFrom { server: SocketAddr, server_name: String },
    /// Split, from an administrator to the merged group's controller: hand the absorbed group
    /// back to its controller at `server`, which resumes it.
    SplitTo { server: SocketAddr, server_name: String },
    /// Merge, from the absorbing controller (a merge peer, never an administrator) to the group
    /// to be absorbed: its state, in binary frames after the answer (`MergeState`); its batches
    /// wait until `HandOff` or `AbortMerge`.
    MergeSide,
    /// Merge, from the absorbing controller: the state taken by `MergeSide` will not be used.
    AbortMerge,
    /// Merge, from the absorbing controller: send this group's members to the merged group
    /// with the ticket that follows in `frames` binary frames.
    HandOff { frames: u32 },
    /// Split, from the merged group's controller: take this group back from the state that
    /// follows in `frames` frames.
    Resume { frames: u32 },
}

impl AdminRequest {
    /// The identity this request names, if any (checked before the controller sees it).
    pub fn identity(&self) -> Option<&str> {
        match self {
            AdminRequest::Revoke { identity }
            | AdminRequest::Readmit { identity }
            | AdminRequest::AclAdd { identity }
            | AdminRequest::AclRemove { identity } => Some(identity),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberRow {
    pub member: u64,
    pub identity: String,
    pub last_seen_ms: u64,
    /// Milliseconds since the controller last heard from it (by the controller's clock).
    #[serde(default)]
    pub idle_ms: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Stats {
    pub group: u64,
    pub members: usize,
    pub epoch: u64,
    pub rekeys: u64,
    pub rekey_bytes: u64,
    /// FEC parity packets sent with rekeys, and their bytes (not in `rekey_bytes`).
    pub parity_packets: u64,
    pub parity_bytes: u64,
    /// NAKs counted, NAKs answered by repair rounds, and the parity packets those rounds sent.
    pub naks_received: u64,
    pub naks: u64,
    pub repair_packets: u64,
    /// Repair rounds sent (each answers the NAKs of one wait).
    pub repair_rounds: u64,
    /// The proactivity factor the next rekey starts from.
    pub rho: f64,
    pub joins: u64,
    /// Resyncs answered over TLS: a member that missed a rekey fetched its keys.
    pub resyncs: u64,
    /// Resyncs answered over UDP (one datagram each way, no handshake).
    pub udp_resyncs: u64,
    /// Signed refusals sent over UDP: resync requests from members the group no longer counts.
    pub udp_refusals: u64,
    /// Liveness datagrams (refreshes over UDP): counted, refused (forged, replayed, from a
    /// stranger, malformed), and dropped because the controller was behind.
    pub liveness_accepted: u64,
    pub liveness_refused: u64,
    pub liveness_dropped: u64,
    pub mean_join_latency_ms: f64,
    /// The group key in force, as "id v version r revision".
    pub active_key: String,
    /// TLS connections open now.
    pub connections_open: u64,
    /// Connections closed at once because a cap (total, per address, per identity) was reached.
    pub connections_over_cap: u64,
    /// Requests answered "unavailable" because the controller's answer did not come in time.
    pub answers_timed_out: u64,
    /// Errors of the controller while handling a request or a tick (it went on).
    pub controller_errors: u64,
    /// Set when this controller runs a relay's subgroup: its membership of the parent group.
    pub parent: Option<ParentLink>,
}

/// A relay's membership of its parent group, as its subgroup's controller reports it.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ParentLink {
    pub group: u64,
    /// This relay's member id in the parent group.
    pub member: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum AdminResponse {
    Members(Vec<MemberRow>),
    Evicted { member: u64, found: bool },
    /// `member`: the member removed with the identity, if it had one.
    Revoked { identity: String, member: Option<u64> },
    /// `changed`: false if the identity was not revoked.
    Readmitted { identity: String, changed: bool },
    /// `changed`: false if the ACL already was so; `evicted`: the member removed with it.
    AclChanged { identity: String, added: bool, changed: bool, evicted: Option<u64> },
    Acl { acl: Vec<String>, revoked: Vec<String> },
    /// `change`: the rotation's number; `verifying_key`: the new public key, hex.
    SigningKeyRotated { change: u64, verifying_key: String },
    /// The key graph's scheme after a transition, and the switch's rekey seq.
    Transitioned { scheme: String, seq: u64 },
    Stats(Stats),
    /// A merge or split state follows in `frames` binary frames.
    MergeState { frames: u32 },
    /// A merge or split step was carried out.
    MergeDone { detail: String },
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

impl AdminRequest {
    /// Binary frames of merge state that follow this request.
    pub fn state_frames(&self) -> u32 {
        match self {
            AdminRequest::HandOff { frames } | AdminRequest::Resume { frames } => *frames,
            _ => 0,
        }
    }

    /// True for the steps one controller asks of its merge peer (they carry or give a group's
    /// keys): served only to the controllers in `merge_peers`, never to an administrator.
    pub fn is_peer_step(&self) -> bool {
        matches!(self, AdminRequest::MergeSide | AdminRequest::AbortMerge | AdminRequest::HandOff { .. } | AdminRequest::Resume { .. })
    }
}

/// Bytes of merge state per binary frame, and frames at most (256 MiB: the graph of a few
/// million members).
pub const STATE_FRAME_LEN: usize = 60_000;
pub const MAX_STATE_FRAMES: u32 = 4096;

/// Frames `state` takes.
pub fn state_frames(state: &[u8]) -> u32 {
    state.len().div_ceil(STATE_FRAME_LEN) as u32
}

/// Writes `state` as binary frames (as many as [`state_frames`] says).
pub async fn write_state<W: tokio::io::AsyncWrite + Unpin>(stream: &mut W, state: &[u8]) -> std::io::Result<()> {
    for chunk in state.chunks(STATE_FRAME_LEN) {
        write_frame(stream, chunk).await?;
    }
    Ok(())
}

/// Reads `frames` binary frames of state, at most [`MAX_STATE_FRAMES`], into zeroized memory
/// (it holds keys).
pub async fn read_state<R: tokio::io::AsyncRead + Unpin>(stream: &mut R, frames: u32) -> std::io::Result<zeroize::Zeroizing<Vec<u8>>> {
    if frames > MAX_STATE_FRAMES {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{frames} frames of merge state: more than {MAX_STATE_FRAMES}")));
    }
    // Frame by frame, then one buffer of the exact size: nothing is allocated for frames that
    // never come, and no growing buffer leaves copies of keys behind.
    let mut parts = Vec::new();
    for _ in 0..frames {
        parts.push(zeroize::Zeroizing::new(read_frame(stream).await?));
    }
    let mut state = zeroize::Zeroizing::new(Vec::with_capacity(parts.iter().map(|p| p.len()).sum()));
    parts.iter().for_each(|part| state.extend_from_slice(part));
    Ok(state)
}

/// A controller an administrator (or a merge peer) reaches, and the TLS client config with
/// the certificate it presents.
#[derive(Clone)]
pub struct AdminTarget {
    pub server: SocketAddr,
    pub server_name: String,
    pub tls: Arc<rustls::ClientConfig>,
}

/// One admin request with merge state after it (if any), and the answer with the state after it.
pub async fn exchange(target: &AdminTarget, request: &AdminRequest, state: Option<&[u8]>) -> Result<(AdminResponse, zeroize::Zeroizing<Vec<u8>>), String> {
    exchange_within(target, request, state, REQUEST_TIMEOUT).await
}

async fn exchange_within(target: &AdminTarget, request: &AdminRequest, state: Option<&[u8]>, within: Duration) -> Result<(AdminResponse, zeroize::Zeroizing<Vec<u8>>), String> {
    let server = target.server;
    let name = ServerName::try_from(target.server_name.clone()).map_err(|e| format!("server name {:?}: {e}", target.server_name))?;
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(server).await.map_err(|e| format!("cannot reach the controller at {server}: {e}"))?;
        let mut stream = TlsConnector::from(target.tls.clone()).connect(name, tcp).await.map_err(|e| format!("TLS with {server}: {e}; {}", crate::request::tls_advice(&e)))?;
        let sent = async {
            write_frame(&mut stream, &encode(request)).await?;
            write_state(&mut stream, state.unwrap_or_default()).await
        };
        sent.await.map_err(|e| format!("cannot send to {server}: {e}"))?;
        let frame = read_frame(&mut stream).await.map_err(|e| format!("{server} closed without an answer: {e}"))?;
        let response: AdminResponse = decode(&frame).map_err(|error| format!("{server}: {error}"))?;
        let frames = if let AdminResponse::MergeState { frames } = response { frames } else { 0 };
        let state = read_state(&mut stream, frames).await.map_err(|e| format!("{server}: merge state: {e}"))?;
        Ok((response, state))
    };
    tokio::time::timeout(within, exchange).await.map_err(|_| format!("no answer from {server} within {} s", within.as_secs()))?
}

/// The state after a `MergeState` answer, or the answer's error.
fn state_of(answer: (AdminResponse, zeroize::Zeroizing<Vec<u8>>), target: &AdminTarget) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    match answer {
        (AdminResponse::MergeState { .. }, state) => Ok(state),
        (AdminResponse::Error(e), _) => Err(format!("{}: {e}", target.server)),
        (other, _) => Err(format!("{}: unexpected answer {other:?}", target.server)),
    }
}

fn done(answer: (AdminResponse, zeroize::Zeroizing<Vec<u8>>), target: &AdminTarget) -> Result<String, String> {
    match answer {
        (AdminResponse::MergeDone { detail }, _) => Ok(detail),
        (AdminResponse::Error(e), _) => Err(format!("{}: {e}", target.server)),
        (other, _) => Err(format!("{}: unexpected answer {other:?}", target.server)),
    }
}

/// The absorbing controller's side of a merge (docs/merge.md), with the controller to absorb
/// at `right` (reached with the absorbing controller's own certificate): the right group's
/// state comes to `absorb`, whose ticket goes back to the right controller, which then sends
/// its members on; if `absorb` refuses, the right controller is told to go on. The state holds
/// the right group's keys: it travels only over these TLS connections between the two
/// controllers and is zeroized after.
pub async fn absorb_from<F, Fut>(right: &AdminTarget, absorb: F) -> Result<String, String>
where
    F: FnOnce(zeroize::Zeroizing<Vec<u8>>) -> Fut,
    Fut: std::future::Future<Output = Result<zeroize::Zeroizing<Vec<u8>>, String>>,
{
    let side = state_of(exchange(right, &AdminRequest::MergeSide, None).await?, right)?;
    let ticket = match absorb(side).await {
        Ok(ticket) => ticket,
        Err(e) => {
            let _ = exchange(right, &AdminRequest::AbortMerge, None).await;
            return Err(e);
        }
    };
    done(exchange(right, &AdminRequest::HandOff { frames: state_frames(&ticket) }, Some(&ticket)).await?, right)
}

/// The merged group's controller's side of a split: `split` gives the absorbed group's state
/// back, which its controller at `right` resumes from.
pub async fn split_to(right: &AdminTarget, split: impl std::future::Future<Output = Result<zeroize::Zeroizing<Vec<u8>>, String>>) -> Result<String, String> {
    let handback = split.await?;
    done(exchange(right, &AdminRequest::Resume { frames: state_frames(&handback) }, Some(&handback)).await?, right)
}

/// `keycast admin merge`: tells the controller `left` to absorb the group whose controller
/// listens at `right` (server address and TLS name).
pub async fn merge(left: &AdminTarget, right: (SocketAddr, String)) -> Result<String, String> {
    let (server, server_name) = right;
    done(exchange_within(left, &AdminRequest::AbsorbFrom { server, server_name }, None, MERGE_TIMEOUT).await?, left)
}

/// `keycast admin split`: tells the merged group's controller `left` to hand the group whose
/// controller listens at `right` back to it.
pub async fn split(left: &AdminTarget, right: (SocketAddr, String)) -> Result<String, String> {
    let (server, server_name) = right;
    done(exchange_within(left, &AdminRequest::SplitTo { server, server_name }, None, MERGE_TIMEOUT).await?, left)
}

/// Time allowed for a merge or split ordered by an administrator: the controller's own
/// requests to its peer, each within [`REQUEST_TIMEOUT`].
pub const MERGE_TIMEOUT: Duration = Duration::from_secs(4 * REQUEST_TIMEOUT.as_secs());

/// Time allowed for a whole admin request: connect, handshake, request and answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends one admin request to the controller at `server` and returns its answer.
pub async fn request(server: SocketAddr, server_name: &str, tls: Arc<rustls::ClientConfig>, request: &AdminRequest) -> Result<AdminResponse, String> {
    let name = ServerName::try_from(server_name.to_owned()).map_err(|e| format!("server name {server_name:?}: {e}"))?;
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(server).await.map_err(|e| format!("cannot reach the controller at {server}: {e}; is `keycast server` running?"))?;
        let mut stream = TlsConnector::from(tls).connect(name, tcp).await.map_err(|e| format!("TLS with {server}: {e}; {}", crate::request::tls_advice(&e)))?;
        write_frame(&mut stream, &encode(request)).await.map_err(|e| format!("cannot send to {server}: {e}"))?;
        let frame = read_frame(&mut stream).await.map_err(|e| format!("{server} closed without an answer: {e}"))?;
        decode(&frame).map_err(|error| format!("{server}: {error}"))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer from {server} within {} s; the controller may be overloaded, try again", REQUEST_TIMEOUT.as_secs()))?
}

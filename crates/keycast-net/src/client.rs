//! The member library (the Iolus client library): joins over TLS, follows the multicast
//! channel, refreshes, resyncs when it falls behind, and gives the application `getkey`,
//! `seal`/`send`, `open` and an event stream.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keycast_core::protocol::traffic::TrafficError;
use keycast_core::protocol::{MemberEvent, MemberSession};
use keycast_core::wire::{
    message_type, Data, GroupId, JoinAccepted, JoinAnswer, JoinRequest, Leave, MessageType, Refresh, ResyncAnswer, ResyncRequest, MAX_MESSAGE_LEN,
};
use keycast_core::{Key, KeyRef, MemberId};
use rustls::pki_types::ServerName;
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

use crate::config::MulticastConfig;
use crate::tls::{read_frame, write_frame};
use crate::{entropy, multicast, now_ms};

#[derive(Clone)]
pub struct MemberSetup {
    pub group: GroupId,
    pub server: SocketAddr,
    pub server_name: String,
    pub multicast: MulticastConfig,
    pub tls: Arc<rustls::ClientConfig>,
    pub refresh_ms: u64,
    pub heartbeat_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the controller: {0}")]
    Io(#[from] std::io::Error),
    #[error("the controller refused: {0} ({1})")]
    Refused(&'static str, String),
    #[error("unexpected answer from the controller: {0}")]
    Protocol(String),
    #[error(transparent)]
    Traffic(#[from] TrafficError),
}

/// What the application receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    Member(MemberEvent),
    /// Application data from the group, opened.
    Data(Vec<u8>),
    /// Application data this member could not open (a key it does not hold, or forged).
    Unreadable(String),
}

/// One request over a fresh TLS connection; returns the answer's frames.
async fn request(setup: &MemberSetup, message: &[u8]) -> Result<Vec<Vec<u8>>, ClientError> {
    let tcp = TcpStream::connect(setup.server).await?;
    let name = ServerName::try_from(setup.server_name.clone()).map_err(|e| ClientError::Protocol(e.to_string()))?;
    let mut tls = TlsConnector::from(setup.tls.clone()).connect(name, tcp).await?;
    write_frame(&mut tls, message).await?;
    let mut frames = Vec::new();
    loop {
        match read_frame(&mut tls).await {
            Ok(frame) => frames.push(frame),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !frames.is_empty() => return Ok(frames),
            Err(e) => return Err(e.into()),
        }
    }
}

fn refusal_or(frame: &[u8], expected: &str) -> ClientError {
    match JoinAnswer::decode(frame) {
        Ok(JoinAnswer::Refused { reason, detail }) => ClientError::Refused(reason.describe(), detail),
        _ => ClientError::Protocol(format!("expected {expected}")),
    }
}

/// One join over TLS without following the group afterwards (load tests): the acceptance
/// and the keys.
pub async fn join_once(setup: &MemberSetup) -> Result<(JoinAccepted, ResyncAnswer), ClientError> {
    let frames = request(setup, &JoinRequest { group: setup.group }.encode()).await?;
    let accepted = match JoinAnswer::decode(&frames[0]) {
        Ok(JoinAnswer::Accepted(a)) => a,
        _ => return Err(refusal_or(&frames[0], "a join answer")),
    };
    let keys = frames.get(1).and_then(|f| ResyncAnswer::decode(f).ok()).ok_or(ClientError::Protocol("no keys after the join answer".into()))?;
    Ok((accepted, keys))
}

/// A TLS 1.3 handshake with client certificate and nothing more (the floor of a join).
pub async fn handshake_only(setup: &MemberSetup) -> Result<(), ClientError> {
    let tcp = TcpStream::connect(setup.server).await?;
    let name = ServerName::try_from(setup.server_name.clone()).map_err(|e| ClientError::Protocol(e.to_string()))?;
    let mut tls = TlsConnector::from(setup.tls.clone()).connect(name, tcp).await?;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
    Ok(())
}

pub struct MemberClient {
    setup: MemberSetup,
    session: Arc<Mutex<MemberSession>>,
    sender: UdpSocket,
    task: JoinHandle<()>,
}

impl Drop for MemberClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MemberClient {
    /// Joins the group; returns once this member holds its keys (after the epoch's rekey).
    pub async fn join(setup: MemberSetup) -> Result<(MemberClient, mpsc::UnboundedReceiver<ClientEvent>), ClientError> {
        // Listen before asking, so no rekey after the join is missed.
        let receiver = multicast::receiver(&setup.multicast)?;
        let (accepted, keys) = join_once(&setup).await?;
        let (session, events) = MemberSession::join(&accepted, keys, setup.heartbeat_ms, now_ms());
        let session = Arc::new(Mutex::new(session));
        let (tx, rx) = mpsc::unbounded_channel();
        for e in events {
            let _ = tx.send(ClientEvent::Member(e));
        }
        let task = tokio::spawn(follow(setup.clone(), session.clone(), receiver, tx));
        Ok((MemberClient { sender: multicast::sender(&setup.multicast)?, setup, session, task }, rx))
    }

    fn with<T>(&self, f: impl FnOnce(&mut MemberSession) -> T) -> T {
        f(&mut self.session.lock().expect("session lock"))
    }

    pub fn member(&self) -> MemberId {
        self.with(|s| s.member())
    }

    /// The traffic key in force (getkey).
    pub fn getkey(&self) -> Option<(KeyRef, Key)> {
        self.with(|s| s.active_key())
    }

    pub fn rekey_seq(&self) -> u64 {
        self.with(|s| s.rekey_seq())
    }

    /// Seals `plaintext` as an encoded data message.
    pub fn seal(&self, plaintext: &[u8]) -> Result<Vec<u8>, ClientError> {
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&entropy()[..16]);
        Ok(self.with(|s| s.seal(plaintext, nonce))?.encode())
    }

    /// Opens an encoded data message.
    pub fn open(&self, message: &[u8]) -> Result<Vec<u8>, ClientError> {
        let data = Data::decode(message).map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(self.with(|s| s.open(&data))?)
    }

    /// Seals and multicasts `plaintext` to the group.
    pub async fn send(&self, plaintext: &[u8]) -> Result<(), ClientError> {
        let message = self.seal(plaintext)?;
        self.sender.send_to(&message, self.setup.multicast.address).await?;
        Ok(())
    }

    /// Leaves the group (acknowledged by the controller).
    pub async fn leave(self) -> Result<(), ClientError> {
        let member = self.member();
        let frames = request(&self.setup, &Leave { group: self.setup.group, member }.encode()).await?;
        match Leave::decode(&frames[0]) {
            Ok(_) => Ok(()),
            Err(_) => Err(refusal_or(&frames[0], "a leave acknowledgement")),
        }
    }
}

/// The member's background work: multicast input, time, refreshes and resyncs.
async fn follow(setup: MemberSetup, session: Arc<Mutex<MemberSession>>, socket: UdpSocket, events: mpsc::UnboundedSender<ClientEvent>) {
    let mut buf = vec![0u8; MAX_MESSAGE_LEN];
    let mut tick = tokio::time::interval(Duration::from_millis(setup.heartbeat_ms.clamp(10, 1000) / 2));
    let mut refresh = tokio::time::interval(Duration::from_millis(setup.refresh_ms.max(10)));
    let emit = |list: Vec<MemberEvent>| list.into_iter().all(|e| events.send(ClientEvent::Member(e)).is_ok());
    loop {
        let ok = tokio::select! {
            received = socket.recv_from(&mut buf) => match received {
                Ok((len, _)) => receive(&session, &buf[..len], &events),
                Err(_) => true,
            },
            _ = tick.tick() => emit(session.lock().expect("session lock").tick(now_ms())),
            _ = refresh.tick() => {
                let (group, member, seq) = { let s = session.lock().expect("session lock"); (s.group(), s.member(), s.rekey_seq()) };
                match request(&setup, &Refresh { group, member, rekey_seq: seq }.encode()).await {
                    Ok(frames) if Refresh::decode(&frames[0]).is_err() => {
                        // Refused: the controller no longer counts this member.
                        emit(vec![MemberEvent::Evicted]);
                        false
                    }
                    // Answered, or the controller is unreachable (heartbeats will tell).
                    _ => true,
                }
            }
        };
        if !ok {
            return;
        }
        let needs_resync = session.lock().expect("session lock").needs_resync();
        if needs_resync && !resync(&setup, &session, &events).await {
            return;
        }
    }
}

/// Handles one datagram; false once the application stopped listening.
fn receive(session: &Mutex<MemberSession>, bytes: &[u8], events: &mpsc::UnboundedSender<ClientEvent>) -> bool {
    let mut session = session.lock().expect("session lock");
    // Dispatch on the type byte: each message is decoded once, by its own decoder.
    let decoded = message_type(bytes).and_then(|kind| match kind {
        MessageType::Data => Data::decode(bytes).map(Some),
        _ => Ok(None),
    });
    let sent = match decoded {
        Ok(Some(data)) => match session.open(&data) {
            Ok(plain) => events.send(ClientEvent::Data(plain)),
            Err(e) => events.send(ClientEvent::Unreadable(e.to_string())),
        },
        Ok(None) => match session.receive(bytes, now_ms()) {
            Ok(list) => list.into_iter().try_for_each(|e| events.send(ClientEvent::Member(e))),
            Err(e) => {
                tracing::debug!(reason = %e, "multicast message dropped");
                Ok(())
            }
        },
        Err(e) => {
            tracing::debug!(reason = %e, "garbage on the multicast channel dropped");
            Ok(())
        }
    };
    sent.is_ok()
}

/// Catches up over TLS; false if this member was evicted or the application stopped.
async fn resync(setup: &MemberSetup, session: &Mutex<MemberSession>, events: &mpsc::UnboundedSender<ClientEvent>) -> bool {
    let (group, member, seq) = {
        let s = session.lock().expect("session lock");
        (s.group(), s.member(), s.rekey_seq())
    };
    let frames = match request(setup, &ResyncRequest { group, member, rekey_seq: seq }.encode()).await {
        Ok(frames) => frames,
        Err(e) => {
            tracing::warn!(error = %e, "resync failed; will retry");
            tokio::time::sleep(Duration::from_millis(setup.heartbeat_ms)).await;
            return true;
        }
    };
    match ResyncAnswer::decode(&frames[0]) {
        Ok(answer) => {
            let list = session.lock().expect("session lock").resynced(answer, now_ms());
            list.into_iter().all(|e| events.send(ClientEvent::Member(e)).is_ok())
        }
        Err(_) => {
            let _ = events.send(ClientEvent::Member(MemberEvent::Evicted));
            false
        }
    }
}

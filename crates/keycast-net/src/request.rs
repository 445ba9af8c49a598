//! A member's requests to the controller: one TLS connection per request, every step under a
//! timeout, failed attempts retried with jittered exponential backoff until the request's
//! deadline. The follow loop runs these in tasks beside it and never awaits one.

use std::fmt;
use std::time::Duration;

use keycast_core::wire::{JoinAnswer, RefusalReason};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_rustls::TlsConnector;
use zeroize::Zeroizing;

use crate::client::{ClientError, MemberSetup};
use crate::config::RequestPolicy;
use crate::entropy;
use crate::tls::{read_frame, write_frame};

/// An answer's frames; join answers carry keys, so they are wiped when dropped.
pub(crate) type Frames = Vec<Zeroizing<Vec<u8>>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    Join,
    Leave,
    Refresh,
    Resync,
}

impl fmt::Display for RequestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RequestKind::Join => "join",
            RequestKind::Leave => "leave",
            RequestKind::Refresh => "refresh",
            RequestKind::Resync => "resync",
        })
    }
}

/// The step of an attempt that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Connect,
    Handshake,
    Answer,
    /// The whole attempt, cut short by the request's deadline.
    Request,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Connect => "connecting to",
            Stage::Handshake => "the TLS handshake with",
            Stage::Answer => "the answer from",
            Stage::Request => "the request to",
        })
    }
}

impl RequestKind {
    fn deadline(self, policy: &RequestPolicy) -> Duration {
        Duration::from_millis(if self == RequestKind::Join { policy.join_deadline_ms } else { policy.deadline_ms })
    }
}

/// Attempts of one refresh or resync in flight at once, at most.
const MAX_HEDGED: usize = 3;

impl RequestKind {
    /// Whether the controller may receive this request twice without harm.
    fn idempotent(self) -> bool {
        matches!(self, RequestKind::Refresh | RequestKind::Resync)
    }
}

/// Sends `message` until `decode` accepts the answer, a definite error comes, or the deadline
/// for `kind` passes (then `ClientError::GaveUp` with the last error). Idempotent requests
/// hedge: an attempt that has not answered after `hedge_after_ms` gets a sibling beside it.
pub(crate) async fn request<T>(
    setup: &MemberSetup,
    kind: RequestKind,
    message: &[u8],
    decode: impl Fn(&Frames) -> Result<T, ClientError>,
) -> Result<T, ClientError> {
    let policy = &setup.requests;
    let started = Instant::now();
    let deadline = started + kind.deadline(policy);
    let hedge = kind.idempotent().then(|| Duration::from_millis(policy.hedge_after_ms));
    let mut backoff = policy.backoff_min_ms.max(1);
    let (mut attempts, mut last_error) = (0u32, None);
    // Dropping the set (an answer came, or the deadline passed) aborts the other attempts.
    let mut running = JoinSet::new();
    let mut next_start = Some(started);
    loop {
        if next_start.is_some_and(|at| at <= Instant::now()) {
            let (setup, message) = (setup.clone(), message.to_vec());
            running.spawn(async move { attempt(&setup, kind, &message).await });
            attempts += 1;
            next_start = hedge.filter(|_| running.len() < MAX_HEDGED).map(|after| Instant::now() + after);
        }
        let wake = next_start.map_or(deadline, |at| at.min(deadline));
        let joined = tokio::select! {
            joined = running.join_next(), if !running.is_empty() => joined,
            _ = sleep_until(wake) => None,
        };
        if let Some(joined) = joined {
            let error = match joined {
                Ok(Ok(frames)) => match decode(&frames) {
                    Ok(answer) => return Ok(answer),
                    Err(e) => e,
                },
                Ok(Err(e)) => e,
                Err(join) => ClientError::Protocol(format!("a {kind} attempt stopped: {join}")),
            };
            if !error.is_transient() {
                return Err(error);
            }
            if running.is_empty() {
                let pause = Duration::from_millis(jittered(backoff));
                if Instant::now() + pause >= deadline {
                    return Err(gave_up(kind, policy, attempts, started, error));
                }
                tracing::warn!("{kind}: waiting for the controller at {}: {error}; retrying in {} ms", setup.server, pause.as_millis());
                next_start = Some(Instant::now() + pause);
                backoff = (backoff.saturating_mul(2)).min(policy.backoff_max_ms.max(1));
            } else {
                tracing::debug!("{kind}: an attempt failed ({error}); {} still running", running.len());
                next_start = next_start.or_else(|| hedge.map(|after| Instant::now() + after));
            }
            last_error = Some(error);
        } else if Instant::now() >= deadline {
            let timed_out = ClientError::TimedOut { addr: setup.server, stage: Stage::Request, after_ms: started.elapsed().as_millis() as u64 };
            return Err(gave_up(kind, policy, attempts, started, last_error.unwrap_or(timed_out)));
        }
    }
}

/// The next pause would pass the deadline: the last error, with what was tried.
fn gave_up(kind: RequestKind, policy: &RequestPolicy, attempts: u32, started: Instant, last: ClientError) -> ClientError {
    let (waited_ms, deadline_ms) = (started.elapsed().as_millis() as u64, kind.deadline(policy).as_millis() as u64);
    ClientError::GaveUp { request: kind, attempts, waited_ms, deadline_ms, last: Box::new(last) }
}

/// A pause between half and all of `ms`, from the operating system's generator.
pub(crate) fn jittered(ms: u64) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&entropy()[..8]);
    ms / 2 + u64::from_le_bytes(bytes) % (ms - ms / 2 + 1)
}

/// One connection: connect, handshake, request, and the answer's frames (two for an accepted
/// join, the acceptance and the keys; one otherwise).
pub(crate) async fn attempt(setup: &MemberSetup, kind: RequestKind, message: &[u8]) -> Result<Frames, ClientError> {
    let policy = &setup.requests;
    let mut tls = connect(setup).await?;
    let addr = setup.server;
    let transport = |source| ClientError::from_io(addr, Stage::Answer, source);
    let exchange = async {
        write_frame(&mut tls, message).await.map_err(transport)?;
        let first = Zeroizing::new(read_frame(&mut tls).await.map_err(transport)?);
        let accepted = kind == RequestKind::Join && matches!(JoinAnswer::decode(&first), Ok(JoinAnswer::Accepted(_)));
        let mut frames = vec![first];
        if accepted {
            frames.push(Zeroizing::new(read_frame(&mut tls).await.map_err(transport)?));
        }
        Ok::<_, ClientError>(frames)
    };
    let frames = timeout(Duration::from_millis(policy.answer_timeout_ms), exchange)
        .await
        .map_err(|_| ClientError::TimedOut { addr, stage: Stage::Answer, after_ms: policy.answer_timeout_ms })??;
    let _ = timeout(Duration::from_millis(100), tokio::io::AsyncWriteExt::shutdown(&mut tls)).await;
    Ok(frames)
}

/// A TCP connection and a TLS 1.3 handshake, each under its timeout.
pub(crate) async fn connect(setup: &MemberSetup) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ClientError> {
    let (policy, addr) = (&setup.requests, setup.server);
    let tcp = timeout(Duration::from_millis(policy.connect_timeout_ms), TcpStream::connect(addr))
        .await
        .map_err(|_| ClientError::TimedOut { addr, stage: Stage::Connect, after_ms: policy.connect_timeout_ms })?
        .map_err(|e| ClientError::from_io(addr, Stage::Connect, e))?;
    let name = ServerName::try_from(setup.server_name.clone())
        .map_err(|e| ClientError::Protocol(format!("server name {:?}: {e}", setup.server_name)))?;
    timeout(Duration::from_millis(policy.handshake_timeout_ms), TlsConnector::from(setup.tls.clone()).connect(name, tcp))
        .await
        .map_err(|_| ClientError::TimedOut { addr, stage: Stage::Handshake, after_ms: policy.handshake_timeout_ms })?
        .map_err(|e| ClientError::from_io(addr, Stage::Handshake, e))
}

/// The controller's refusal in `frame`, or a protocol error naming what was expected.
pub(crate) fn refusal_or(frame: &[u8], expected: &str) -> ClientError {
    match JoinAnswer::decode(frame) {
        Ok(JoinAnswer::Refused { reason, detail }) => ClientError::Refused(reason, detail),
        _ => ClientError::Protocol(format!("expected {expected}")),
    }
}

/// A refusal that will not change by asking again (everything but "unavailable").
pub(crate) fn definite(reason: RefusalReason) -> bool {
    reason != RefusalReason::Unavailable
}

/// A TLS failure that retrying cannot cure: certificates, alerts, incompatible peers.
pub(crate) fn definite_tls(error: &std::io::Error) -> Option<&rustls::Error> {
    let tls = error.get_ref()?.downcast_ref::<rustls::Error>()?;
    matches!(
        tls,
        rustls::Error::InvalidCertificate(_)
            | rustls::Error::AlertReceived(_)
            | rustls::Error::PeerIncompatible(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::UnsupportedNameType
    )
    .then_some(tls)
}

/// What an operator should check after a TLS failure with the controller, from what rustls saw.
pub(crate) fn tls_advice(error: &std::io::Error) -> &'static str {
    use rustls::{AlertDescription as Alert, CertificateError as Cert, Error};
    match error.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
        Some(Error::InvalidCertificate(Cert::BadSignature | Cert::UnknownIssuer)) => {
            "the controller's certificate is not signed by this group's CA: this config's `ca` is another group's, or another group's controller listens at this address"
        }
        Some(Error::InvalidCertificate(Cert::NotValidForName | Cert::NotValidForNameContext { .. })) => {
            "the controller's certificate does not carry this config's `server_name`: set it to a name in that certificate"
        }
        Some(Error::AlertReceived(Alert::UnknownCA | Alert::BadCertificate | Alert::DecryptError | Alert::CertificateRequired)) => {
            "the controller refused this certificate: it is not signed by the controller's CA (a certificate of another group?)"
        }
        _ => "check this config's ca, cert and key files and server_name",
    }
}

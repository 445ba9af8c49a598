//! keycast-net: the drivers of DESIGN.md. They move bytes and time in and out of the sans-IO
//! state machines of `keycast_core::protocol`: TLS 1.3 (rustls, client certificates required)
//! for joins, resyncs and administration; UDP multicast (socket2) for rekeys, heartbeats and
//! data; redb for the controller's log. The member library ([`client::MemberClient`]) is what
//! applications link: `getkey`, `seal`, `open`, and an event stream.

pub mod admin;
pub mod client;
pub mod config;
pub mod distributed;
pub mod multicast;
pub mod local;
pub mod loss;
pub mod pki;
pub mod priority;
mod reflector;
pub mod relay;
pub mod request;
pub mod server;
pub mod status;
pub mod store;
pub mod tls;

/// The value behind `mutex`, even if a thread panicked while holding it: every state the
/// drivers share this way (a member session, the heartbeats, the recent rekeys) completes
/// each update before the lock is released, so it stays consistent.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Milliseconds since the Unix epoch: the drivers' only clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// 32 bytes from the operating system's generator.
pub fn entropy() -> [u8; 32] {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's random generator");
    bytes
}

/// A fresh random nonce for a data message's wrapped key.
pub fn data_nonce() -> [u8; keycast_core::wire::control::DATA_NONCE_LEN] {
    let mut bytes = [0u8; keycast_core::wire::control::DATA_NONCE_LEN];
    getrandom::fill(&mut bytes).expect("the operating system's random generator");
    bytes
}

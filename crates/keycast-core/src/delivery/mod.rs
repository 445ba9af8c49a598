//! Reliable rekey delivery under loss (issue 14): the pure layers of Zhang, Lam, Lee and
//! Yang's protocol (IEEE/ACM ToN 2003, Keystone), described in `docs/delivery.md`.
//!
//! - [`fec`]: Reed-Solomon coding of a block of k rekey packets into parity shards;
//! - [`proactivity`]: the proactivity factor rho (round-1 packets per block over k), adapted
//!   after each rekey toward a target NAK count;
//! - [`recovery`]: a member's state for one rekey: its packets, direct or decoded, how many
//!   shards it still needs, and NAK backoff and suppression;
//! - [`server_round`]: the server's NAK collection for one round and the per-block repair.
//!
//! Nothing here does I/O, reads a clock or draws randomness: times and random numbers are
//! inputs. Wire messages and drivers are not part of this module yet.

pub mod fec;
pub mod proactivity;
pub mod recovery;
pub mod server_round;

/// How many more shards a member needs for one block (in a NAK), or how many fresh parity
/// shards the server sends for it (in a repair).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlockNeed {
    pub block: u32,
    pub needed: u16,
}

/// A member's NAK for one rekey: per incomplete block, the shards it still needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NakRequest {
    pub blocks: Vec<BlockNeed>,
}

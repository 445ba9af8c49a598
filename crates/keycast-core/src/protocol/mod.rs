//! Protocol state machines (sans-IO): the controller and the member. They take requests,
//! datagrams and the time as inputs and return what to persist, send and report; drivers do
//! the I/O.

pub mod controller;
pub mod distributed_flat;
pub mod failover;
pub mod heartbeats;
pub mod member;
pub mod merge;
pub mod merge_state;
pub mod reflector;
pub mod relay;
mod pending;
mod repair;
mod rounds;
pub mod snapshot;
pub mod traffic;

pub use controller::{Controller, ControllerError, Departure, FixedPolicy, GroupPolicy, JoinStatus, LivenessAnswer, LivenessRefused, DATAGRAM_REFUSALS_PER_SECOND, UDP_RESYNC_INTERVAL_MS, Output, Record, Refusal, Request, SchemeTarget, DEFAULT_SNAPSHOT_EVERY};
pub use member::{MemberEvent, MemberInputError, MemberSession, ResyncCauses};
pub use snapshot::Snapshot;

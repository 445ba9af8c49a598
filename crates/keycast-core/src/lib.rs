//! keycast-core: the pure layer of keycast (see DESIGN.md).
//!
//! Key graphs (star, tree, flat), batch rekey planning, key wrapping and derivation, the
//! member's key state and rekey packaging strategies. Nothing here does I/O or reads a clock;
//! randomness comes in as a [`keygen::BatchSeed`] per batch.

#![forbid(unsafe_code)]

pub mod delivery;
pub mod graph;
pub mod key;
pub mod keygen;
pub mod keyring;
pub mod member;
pub mod protocol;
pub mod strategy;
pub mod wire;
pub mod wrap;

pub use graph::{
    import_graph, new_graph, Batch, FlatIds, GraphConfig, GraphError, GraphStats, JoinPolicy, KeyGraph, MemberId, Position, RekeyPlan,
    Scheme, Welcome,
};
pub use key::{Key, KeyId, KeyRef};
pub use keygen::BatchSeed;
pub use keyring::KeyRing;
pub use member::{MemberError, MemberKeys, MemberUpdate};
pub use strategy::{package, RekeyMessage, Strategy};
pub use wrap::{Wrap, Wrapper};

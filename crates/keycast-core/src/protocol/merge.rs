//! The messages of a merge or split on each side's channel (sans-IO): the side's rekey as
//! signed packets under that side's controller key, and on the side that changes controller,
//! before its rekey, the signed notice that tells its members which controller to follow
//! and how to rename their keys ([`crate::graph::merge`], `docs/merge.md`).
//!
//! Both controllers belong to one operator, who orders the merge holding both: the caller
//! hands in each side's signer and next rekey seq. Running the merged group inside a
//! [`super::Controller`] is not built yet.

use std::net::SocketAddr;

use crate::graph::merge::{Merge, Split, Subtree};
use crate::graph::RekeyPlan;
use crate::wire::rekey::{encode_rekey, PacketConfig, PacketiseError, RekeyContext};
use crate::wire::{GroupId, MergeNotice, Move, Signer, TlsServerName, VerifyingKey};

/// Where members reach a controller: its TLS address and the server name its certificate
/// carries, and its multicast group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contact {
    pub controller: SocketAddr,
    pub server_name: TlsServerName,
    pub multicast: SocketAddr,
}

/// One side's multicast channel as its controller runs it now.
pub struct Channel<'a> {
    pub group: GroupId,
    /// The epoch in force: the rekey is active at once (an ordered change, as an immediate eviction).
    pub epoch: u64,
    /// The last rekey seq sent on this channel; the merge rekey takes the next.
    pub last_seq: u64,
    pub signer: &'a Signer,
    pub packets: PacketConfig,
}

/// The controller the moving side follows from now on.
#[derive(Clone, Debug)]
pub struct Destination {
    pub group: GroupId,
    pub signer: VerifyingKey,
    pub contact: Contact,
}

/// What one side's members receive, in this order.
#[derive(Clone, Debug, Default)]
pub struct SideMessages {
    /// The notice, for the side whose members change controller: on the channel they are on.
    pub notice: Option<Vec<u8>>,
    /// The rekey's packets (seq one above the channel's last): on the channel of the controller
    /// whose root the side still holds (its own at a merge, its next one at a split).
    pub rekey: Vec<Vec<u8>>,
}

fn rekey_packets(plan: &RekeyPlan, channel: &Channel<'_>) -> Result<Vec<Vec<u8>>, PacketiseError> {
    let context = RekeyContext { group: channel.group, epoch: channel.epoch, seq: channel.last_seq + 1, activation: channel.epoch };
    Ok(encode_rekey(plan, context, channel.packets, channel.signer)?.packets)
}

/// The notice on `channel` that moves its members to `to`, whose channel is `next`.
fn notice(channel: &Channel<'_>, change: Move, member_offset: u64, to: Destination, next: &Channel<'_>) -> Vec<u8> {
    let notice = MergeNotice {
        group: channel.group,
        after_seq: channel.last_seq,
        change,
        member_offset,
        next_group: to.group,
        next_epoch: next.epoch,
        next_seq: next.last_seq,
        next_signer: to.signer,
        controller: to.contact.controller,
        server_name: to.contact.server_name,
        multicast: to.contact.multicast,
    };
    notice.sign(channel.signer).encode()
}

/// The merge's messages. The merge rekey is the merged group's (`merged`: the left side's
/// channel, whose controller runs the merged group) next rekey: one packet with the new root
/// wrapped under each side's old root, signed by the merged controller and sent on both
/// channels. On the right side's channel (`right`) the notice comes first, signed by the
/// right controller (the one its members trust), naming the merged controller (`to`) and the
/// member offset given to [`crate::graph::merge::merge_trees`].
pub fn merge_messages(
    merge: &Merge,
    merged: &Channel<'_>,
    right: &Channel<'_>,
    right_member_offset: u64,
    to: Destination,
) -> Result<(SideMessages, SideMessages), PacketiseError> {
    let rekey = rekey_packets(&merge.rekey(), merged)?;
    let left_side = SideMessages { notice: None, rekey: rekey.clone() };
    let right_side = SideMessages { notice: Some(notice(right, Move::Merge(Subtree::Right), right_member_offset, to, merged)), rekey };
    Ok((left_side, right_side))
}

/// The split's messages: the left side's rekey on the merged group's channel (`merged`, whose
/// controller the left side keeps); for the right side, the notice on the merged channel,
/// signed by the merged controller (the one its members trust), naming the right side's own
/// controller (`to`), then its rekey on that controller's channel (`right`), signed by it.
pub fn split_messages(
    split: &Split,
    merged: &Channel<'_>,
    right: &Channel<'_>,
    right_member_offset: u64,
    to: Destination,
) -> Result<(SideMessages, SideMessages), PacketiseError> {
    let left_side = SideMessages { notice: None, rekey: rekey_packets(&split.left_rekey, merged)? };
    let right_side = SideMessages {
        notice: Some(notice(merged, Move::Split, right_member_offset, to, right)),
        rekey: rekey_packets(&split.right_rekey, right)?,
    };
    Ok((left_side, right_side))
}

//! What `keycast member` prints for each event: one line in plain words for people, or one
//! JSON object per line (`--json`) for programs.

use keycast_core::protocol::traffic::TrafficError;
use keycast_core::protocol::MemberEvent;
use keycast_core::KeyRef;
use keycast_net::client::ClientEvent;
use serde_json::{json, Value};

/// Turns a member's events into lines; remembers the first group key it held, to tell traffic
/// sealed before it joined from traffic under a key it is still missing.
#[derive(Default)]
pub struct EventPrinter {
    first_key: Option<KeyRef>,
    key_in_force: bool,
}

/// One event, for both audiences.
pub struct EventLine {
    pub text: String,
    pub json: Value,
}

/// Application data opened, for a member or a participant.
pub fn data_line(bytes: &[u8]) -> EventLine {
    let text = String::from_utf8_lossy(bytes);
    EventLine { text: format!("data: {text}"), json: json!({"event": "data", "text": text}) }
}

impl EventPrinter {
    /// `epoch` is the controller's epoch as the member last heard it: a rekey whose key takes
    /// effect later is explained as delayed activation, one in force already (an eviction's) not.
    pub fn line(&mut self, event: &ClientEvent, epoch: u64) -> EventLine {
        match event {
            ClientEvent::Member(event) => self.member_event(event, epoch),
            ClientEvent::Data(bytes) => data_line(bytes),
            ClientEvent::Unreadable(why) => self.unreadable(why),
            ClientEvent::Rejoined { member } => EventLine {
                text: format!("rejoined as member {} (the controller had expired this member; it joined again by itself)", member.0),
                json: json!({"event": "rejoined", "member": member.0}),
            },
            ClientEvent::FailedOver { server, member } => EventLine {
                text: format!("failed over: the subgroup's relay went silent; joined its standby at {server} as member {}", member.0),
                json: json!({"event": "failed_over", "server": server.to_string(), "member": member.0}),
            },
        }
    }

    fn member_event(&mut self, event: &MemberEvent, epoch: u64) -> EventLine {
        let (text, json) = match event {
            MemberEvent::Joined { member, rekey_seq } => (
                format!("joined as member {member} with the keys of rekey {rekey_seq}", member = member.0),
                json!({"event": "joined", "member": member.0, "rekey_seq": rekey_seq}),
            ),
            MemberEvent::Rekeyed { seq, group_key, activation } => {
                self.first_key.get_or_insert(*group_key);
                let when = if *activation > epoch {
                    format!("in force from epoch {activation} (delayed activation: the key in force stays in use until then, so every member holds the new key before anyone seals with it)")
                } else {
                    format!("in force at once (epoch {activation}: an eviction's rekey does not wait)")
                };
                (
                    format!("rekey {seq}: new group key {group_key}, {when}"),
                    json!({"event": "rekeyed", "seq": seq, "group_key": group_key.to_string(), "activation_epoch": activation}),
                )
            }
            MemberEvent::KeyActivated { group_key, epoch } => {
                self.first_key.get_or_insert(*group_key);
                self.key_in_force = true;
                (
                    format!("epoch {epoch}: group key {group_key} is now in force; data is sealed and opened under it"),
                    json!({"event": "key_activated", "group_key": group_key.to_string(), "epoch": epoch}),
                )
            }
            MemberEvent::OutOfSync { reason } => (
                format!("out of sync ({reason}): asking the controller for the current keys"),
                json!({"event": "out_of_sync", "reason": reason}),
            ),
            MemberEvent::Contradiction { reason } => (
                format!("warning: the controller announced something that contradicts this member's keys ({reason}); resyncing"),
                json!({"event": "contradiction", "reason": reason}),
            ),
            MemberEvent::Resynced { rekey_seq } => (
                format!("caught up: holding the keys of rekey {rekey_seq}"),
                json!({"event": "resynced", "rekey_seq": rekey_seq}),
            ),
            MemberEvent::Evicted => (
                "evicted: the controller removed this member (an administrator's eviction, an ACL change or no refresh in time)".to_string(),
                json!({"event": "evicted"}),
            ),
            MemberEvent::ControllerLost => (
                "no heartbeat from the controller for three intervals: it is down or unreachable; data still flows under the key in force".to_string(),
                json!({"event": "controller_lost"}),
            ),
            MemberEvent::MembershipChanged { seq, joined, left } => {
                let ids = |members: &[keycast_core::MemberId]| members.iter().map(|m| m.0).collect::<Vec<_>>();
                (
                    format!("rekey {seq}: members joined {:?}, left {:?}", ids(joined), ids(left)),
                    json!({"event": "membership_changed", "seq": seq, "joined": ids(joined), "left": ids(left)}),
                )
            }
            MemberEvent::SignerChanged { change } => (
                format!("the controller replaced its signing key (rotation {change}); this member follows it"),
                json!({"event": "signer_changed", "rotation": change}),
            ),
            MemberEvent::Moved { group, member, controller, server_name, multicast } => (
                format!("moved to group {} as member {} (a merge or split): controller {controller} ({server_name}), multicast {multicast}; keys kept", group.0, member.0),
                json!({"event": "moved", "group": group.0, "member": member.0, "controller": controller.to_string(), "server_name": server_name.as_str(), "multicast": multicast.to_string()}),
            ),
            MemberEvent::Repaired { seq, packets, after_nak } => {
                let from = if *after_nak { "a repair round it asked for (NAK)" } else { "the parity sent with it" };
                (
                    format!("rekey {seq}: rebuilt {packets} lost packet(s) from {from}"),
                    json!({"event": "repaired", "seq": seq, "packets": packets, "by": if *after_nak { "repair" } else { "fec" }}),
                )
            }
        };
        EventLine { text, json }
    }

    fn unreadable(&self, why: &TrafficError) -> EventLine {
        let (text, kind) = match why {
            TrafficError::UnknownKey(key) if self.sealed_before_joining(key) => (
                format!("unreadable data: sealed under {key}, a group key from before this member joined; a joiner cannot read earlier traffic (by design, nothing is wrong)"),
                "before_join",
            ),
            TrafficError::UnknownKey(key) => (
                format!("unreadable data: sealed under {key}, a key this member has not received; it catches up by resync if it missed a rekey"),
                "unknown_key",
            ),
            other => (format!("unreadable data: {other}"), "refused"),
        };
        let key = match why {
            TrafficError::UnknownKey(key) => Some(key.to_string()),
            _ => None,
        };
        EventLine { text, json: json!({"event": "unreadable", "kind": kind, "key": key, "reason": why.to_string()}) }
    }

    /// Traffic under a key this member never held is from before it joined when no key was
    /// yet in force for it, or when it is an older version of the first group key it held.
    fn sealed_before_joining(&self, key: &KeyRef) -> bool {
        let older = |first: &KeyRef| key.id == first.id && (key.version, key.revision) < (first.version, first.revision);
        !self.key_in_force || self.first_key.as_ref().is_some_and(older)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keycast_core::KeyId;

    fn key(version: u32) -> KeyRef {
        KeyRef { id: KeyId(0x0800_0000), version, revision: 0 }
    }

    #[test]
    fn keys_read_as_refs_and_delayed_activation_is_explained() {
        let mut printer = EventPrinter::default();
        let line = printer.line(&ClientEvent::Member(MemberEvent::Rekeyed { seq: 2, group_key: key(3), activation: 10 }), 9);
        assert!(line.text.contains("0x08000000v3r0") && line.text.contains("delayed activation"), "{}", line.text);
        assert_eq!(line.json["group_key"], "0x08000000v3r0");
        assert_eq!(line.json["activation_epoch"], 10);
        let evicted = printer.line(&ClientEvent::Member(MemberEvent::Rekeyed { seq: 3, group_key: key(4), activation: 10 }), 10);
        assert!(evicted.text.contains("in force at once") && !evicted.text.contains("delayed"), "{}", evicted.text);
    }

    #[test]
    fn traffic_from_before_the_join_says_so() {
        let mut printer = EventPrinter::default();
        printer.line(&ClientEvent::Member(MemberEvent::Rekeyed { seq: 2, group_key: key(3), activation: 10 }), 9);
        let early = printer.line(&ClientEvent::Unreadable(TrafficError::UnknownKey(key(2))), 9);
        assert!(early.text.contains("before this member joined"), "{}", early.text);
        assert_eq!(early.json["kind"], "before_join");
        printer.line(&ClientEvent::Member(MemberEvent::KeyActivated { group_key: key(3), epoch: 10 }), 10);
        let late_but_old = printer.line(&ClientEvent::Unreadable(TrafficError::UnknownKey(key(2))), 9);
        assert_eq!(late_but_old.json["kind"], "before_join");
        let missing = printer.line(&ClientEvent::Unreadable(TrafficError::UnknownKey(key(5))), 10);
        assert!(missing.text.contains("has not received"), "{}", missing.text);
        assert_eq!(missing.json["kind"], "unknown_key");
    }
}

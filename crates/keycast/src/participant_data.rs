//! Application data in the participant stage of `keycast member`: the group's data keeps
//! flowing on its multicast channel with no controller, sealed and opened under the
//! distributed group's TEK (`keycast_core::protocol::distributed_flat::traffic`).

use std::net::SocketAddr;

use keycast_core::protocol::distributed_flat::traffic::ParticipantTraffic;
use keycast_core::protocol::traffic::Fresh;
use keycast_core::wire::{message_type, Data, GroupId, MessageType};
use keycast_net::config::MemberConfig;
use keycast_net::distributed::DistributedParticipant;
use serde_json::json;
use tokio::net::UdpSocket;

use crate::member_events::{data_line, EventLine};

/// The sending half and the sealing state; the receiving socket is the caller's (it is
/// awaited beside everything else).
pub(crate) struct ParticipantData {
    traffic: ParticipantTraffic,
    sender: UdpSocket,
    group_addr: SocketAddr,
    /// Whether a controller's heartbeat was heard on the channel since this stage began.
    heard_controller: bool,
}

impl ParticipantData {
    /// The group's data channel (the member config's multicast address) for participant `id`.
    pub fn open(config: &MemberConfig, id: u64) -> Result<(UdpSocket, ParticipantData), String> {
        let io = |e: std::io::Error| format!("the group's data channel {}: {e}", config.multicast.address);
        let receiver = keycast_net::multicast::receiver(&config.multicast).map_err(io)?;
        let sender = keycast_net::multicast::sender(&config.multicast).map_err(io)?;
        let traffic = ParticipantTraffic::new(GroupId(config.group), id, keycast_net::now_ms());
        Ok((receiver, ParticipantData { traffic, sender, group_addr: SocketAddr::V4(config.multicast.address), heard_controller: false }))
    }

    /// Seals `plaintext` under the TEK in force and multicasts it.
    pub async fn send(&mut self, participant: &DistributedParticipant, plaintext: &[u8]) -> Result<(), String> {
        let tek = participant.tek().ok_or("no TEK in force")?;
        let fresh = Fresh { message_key: keycast_net::entropy(), nonce: keycast_net::data_nonce() };
        let data = self.traffic.seal(&tek, plaintext, fresh, keycast_net::now_ms()).map_err(|e| e.to_string())?;
        self.sender.send_to(&data.encode(), self.group_addr).await.map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The line for a datagram heard on the data channel: data opened, or why not; a warning
    /// the first time a controller's heartbeat is heard (the old controller came back: the
    /// participants do not follow it, and the operator should stop it); None for the rest.
    pub fn received(&mut self, bytes: &[u8], participant: &DistributedParticipant) -> Option<EventLine> {
        match message_type(bytes).ok()? {
            MessageType::Data => {}
            MessageType::Heartbeat if !self.heard_controller => {
                self.heard_controller = true;
                return Some(EventLine {
                    text: "warning: a controller's heartbeat was heard on the group's channel; the participants go on without it: stop it, or take the group back with `take-back`".into(),
                    json: json!({"event": "controller_heard"}),
                });
            }
            _ => return None,
        }
        let data = Data::decode(bytes).ok()?;
        Some(match self.traffic.open(&data, |r| participant.held_once(r)) {
            Ok(plain) => data_line(&plain),
            Err(why) => EventLine { text: format!("unreadable data: {why}"), json: json!({"event": "unreadable", "reason": why.to_string()}) },
        })
    }
}

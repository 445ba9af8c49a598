//! The joiners' reflector's driver (Mukkamalla and Katz 4.4): with `policy.reflector` on, the
//! controller's process hears its group's multicast channel and sends, for each data message
//! under a key the joiners still waiting lack, a copy re-wrapped under their joiners' key
//! (`keycast_core::protocol::reflector::Reflector` decides). One task: it receives, takes the
//! controller's keys whenever they change, and sends; it never waits on a peer.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use keycast_core::protocol::reflector::{ReflectionKeys, Reflector};
use keycast_core::wire::{message_type, Data, GroupId, MessageType, MAX_MESSAGE_LEN};
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::config::MulticastConfig;
use crate::{data_nonce, lock, multicast};

/// The controller's reflection keys as its task last published them, and a signal on change.
#[derive(Default)]
pub(crate) struct ReflectionFeed {
    keys: Mutex<Option<ReflectionKeys>>,
    changed: Notify,
}

impl ReflectionFeed {
    /// Publishes `keys` if they differ from the last ones.
    pub(crate) fn publish(&self, keys: Option<ReflectionKeys>) {
        let mut current = lock(&self.keys);
        if *current != keys {
            *current = keys;
            self.changed.notify_one();
        }
    }

    fn get(&self) -> Option<ReflectionKeys> {
        lock(&self.keys).clone()
    }
}

/// Starts the reflector of `group` on its channel.
pub(crate) fn spawn(config: &MulticastConfig, group: GroupId, feed: Arc<ReflectionFeed>) -> std::io::Result<JoinHandle<()>> {
    let receiver = multicast::receiver(config)?;
    let sender = multicast::sender(config)?;
    let task = ReflectorTask { reflector: Reflector::new(group), own: sender.local_addr()?, sender, channel: config.address.into(), feed };
    Ok(tokio::spawn(task.run(receiver)))
}

struct ReflectorTask {
    reflector: Reflector,
    sender: UdpSocket,
    /// The sender's address: its copies come back by multicast loop and are skipped unread.
    own: SocketAddr,
    channel: SocketAddr,
    feed: Arc<ReflectionFeed>,
}

impl ReflectorTask {
    async fn run(mut self, receiver: UdpSocket) {
        let mut buf = vec![0u8; MAX_MESSAGE_LEN];
        self.install();
        loop {
            tokio::select! {
                received = receiver.recv_from(&mut buf) => match received {
                    Ok((len, from)) if from != self.own => self.hear(&buf[..len]).await,
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "reflector: multicast receive failed"),
                },
                _ = self.feed.changed.notified() => self.install(),
            }
        }
    }

    fn install(&mut self) {
        if let Some(keys) = self.feed.get() {
            self.reflector.install(&keys);
        }
    }

    async fn hear(&mut self, bytes: &[u8]) {
        if message_type(bytes) != Ok(MessageType::Data) {
            return;
        }
        let Ok(data) = Data::decode(bytes) else { return };
        // A rekey may have just been made: its key is published with it.
        if self.reflector.lacks_key(&data) {
            self.install();
        }
        match self.reflector.reflect(&data, data_nonce) {
            Ok(copies) => {
                for copy in copies {
                    if let Err(e) = self.sender.send_to(&copy.encode(), self.channel).await {
                        tracing::warn!(error = %e, "reflector: multicast send failed");
                    }
                }
            }
            Err(reason) => tracing::debug!(%reason, "data not reflected"),
        }
    }
}

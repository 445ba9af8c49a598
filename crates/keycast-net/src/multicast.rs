//! UDP multicast sockets. The outgoing interface is pinned (127.0.0.1 unless configured) and
//! the TTL is 1, so datagrams never leave the host by default. Receivers bind to the group
//! address (so they see only that group) with IP_MULTICAST_ALL off, and join on the interface.

use std::net::{SocketAddr, SocketAddrV4};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use crate::config::MulticastConfig;

pub fn sender(config: &MulticastConfig) -> std::io::Result<UdpSocket> {
    let socket = blocking_sender(config)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// A sender for a thread of its own (the controller's heartbeats).
pub fn blocking_sender(config: &MulticastConfig) -> std::io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_multicast_if_v4(&config.interface)?;
    socket.set_multicast_ttl_v4(config.ttl)?;
    socket.set_multicast_loop_v4(true)?;
    socket.bind(&SocketAddr::V4(SocketAddrV4::new(config.interface, 0)).into())?;
    Ok(socket.into())
}

pub fn receiver(config: &MulticastConfig) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&SocketAddr::V4(config.address).into())?;
    socket.join_multicast_v4(config.address.ip(), &config.interface)?;
    socket.set_multicast_all_v4(false)?;
    socket.set_recv_buffer_size(4 << 20)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket.into())
}

/// A group address and port of their own on loopback, for tests and demos: the address is
/// drawn from the port, so concurrent runs on one host do not hear each other.
pub fn loopback_group() -> std::io::Result<MulticastConfig> {
    let port = free_port()?;
    let group_ip = std::net::Ipv4Addr::new(239, 255, (port >> 8) as u8, port as u8);
    Ok(MulticastConfig { address: SocketAddrV4::new(group_ip, port), interface: std::net::Ipv4Addr::LOCALHOST, ttl: 1 })
}

/// A free port on the loopback interface, for tests and the demo.
pub fn free_port() -> std::io::Result<u16> {
    let probe = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(probe.local_addr()?.port())
}

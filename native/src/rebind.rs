//! An active migration's old socket, still read for a grace period.
//!
//! `Endpoint::rebind` (quinn 0.11.12, unchanged on quinn's main branch at a1931ab) keeps the
//! previous socket as `prev_socket` and reads it before the new one, so that packets the peer
//! sent to the old address before it noticed the move still arrive. Two things go wrong there
//! mid-transfer:
//!
//! * The endpoint driver drops the old socket's "more to read" (`keep_going`: its
//!   `drive_recv` ignores the `PollProgress` of `prev_socket`). A receive cycle has a time
//!   budget (`RECV_TIME_BOUND`, 50 µs, about one batch); when it runs out while datagrams wait
//!   on the old socket, the driver does not poll again, and nothing wakes it for that socket:
//!   its readiness stays set, so no waker is registered. The old socket is next read when
//!   something else wakes the driver, in practice the peer's PATH_CHALLENGE arriving on the new
//!   socket one round trip later.
//! * On the first packet that arrives on the new socket the driver closes the old one, with
//!   whatever was queued there unread. Together, a download that migrates at 40 ms RTT lost
//!   about 130 datagrams (190 KB, most of what the server had in flight) and stalled for
//!   loss recovery on top of the path validation (`quicmesh bench migration`; see
//!   docs/performance.md, "Migration").
//!
//! [`MigratedSocket`] is the new socket with the old one inside: its receive reads both (in
//! turns, so that neither can starve the other) for the grace period quicmesh gives old
//! sockets (`OLD_SOCKET_GRACE`, as the aioquic engine does), then closes the old one. quinn
//! sees the old socket's datagrams come from its current socket, whose `keep_going` it
//! honours. Everything else (sending, the local address, segmentation offload) is the new
//! socket's. The PING that makes the peer notice the move is quinn's own
//! (`Connection::local_address_changed`).

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use crate::engine::lock;

/// A rebound endpoint's socket: `current` for everything, and for a while also the receive side
/// of `previous`, the socket it replaced.
pub struct MigratedSocket {
    current: Arc<dyn AsyncUdpSocket>,
    previous: Mutex<Option<Arc<dyn AsyncUdpSocket>>>,
}

impl MigratedSocket {
    /// `current` replaces `previous`, which is still read for `grace`, then closed (unless quinn
    /// or an older [`MigratedSocket`] still holds it). Must run in the tokio runtime's context.
    pub fn wrap(
        current: Arc<dyn AsyncUdpSocket>,
        previous: Arc<dyn AsyncUdpSocket>,
        grace: Duration,
    ) -> Arc<dyn AsyncUdpSocket> {
        let socket = Arc::new(MigratedSocket {
            current,
            previous: Mutex::new(Some(previous)),
        });
        let expiring = Arc::downgrade(&socket);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            retire(&expiring);
        });
        socket
    }

    /// Whether the old socket is still read.
    fn reads_previous(&self) -> bool {
        self.previous().is_some()
    }

    fn previous(&self) -> Option<Arc<dyn AsyncUdpSocket>> {
        lock(&self.previous).clone()
    }

    fn drop_previous(&self) {
        *lock(&self.previous) = None;
    }
}

/// The grace period is over: stop reading the old socket (closing it if nobody else holds it).
fn retire(socket: &Weak<MigratedSocket>) {
    if let Some(socket) = socket.upgrade() {
        socket.drop_previous();
    }
}

impl fmt::Debug for MigratedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MigratedSocket")
            .field("current", &self.current)
            .field("reads_previous", &self.reads_previous())
            .finish()
    }
}

impl AsyncUdpSocket for MigratedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Arc::clone(&self.current).create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.current.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let Some(previous) = self.previous() else {
            return self.current.poll_recv(cx, bufs, meta);
        };
        // The old socket first: what waits there was sent before what waits on the new one
        // (the peer moved later), and a packet on the new path may retire the connection ID
        // the ones on the old path carry, which quinn then drops as unknown.
        match previous.poll_recv(cx, bufs, meta) {
            Poll::Ready(Ok(count)) => return Poll::Ready(Ok(count)),
            // A broken old socket is dropped, as quinn drops its `prev_socket`; the new one
            // carries on.
            Poll::Ready(Err(_)) => self.drop_previous(),
            Poll::Pending => {}
        }
        self.current.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.current.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.current.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.current.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.current.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::Runtime;
    use std::net::UdpSocket;

    fn bound() -> (UdpSocket, SocketAddr) {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let address = socket.local_addr().unwrap();
        (socket, address)
    }

    /// Receive one datagram through `socket` (within 5 s).
    async fn receive(socket: &Arc<dyn AsyncUdpSocket>) -> Vec<u8> {
        let mut data = [0u8; 1500];
        let mut meta = [RecvMeta::default()];
        let received = std::future::poll_fn(|cx| {
            let mut bufs = [IoSliceMut::new(&mut data)];
            socket.poll_recv(cx, &mut bufs, &mut meta)
        });
        let count = tokio::time::timeout(Duration::from_secs(5), received)
            .await
            .expect("a datagram within 5 s")
            .unwrap();
        assert_eq!(count, 1);
        data[..meta[0].len].to_vec()
    }

    #[test]
    fn both_sockets_are_read_until_the_grace_period_ends() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (old, old_address) = bound();
            let (new, new_address) = bound();
            let old = quinn::TokioRuntime.wrap_udp_socket(old).unwrap();
            let new = quinn::TokioRuntime.wrap_udp_socket(new).unwrap();
            let socket = MigratedSocket::wrap(new, old, Duration::from_millis(200));
            assert_eq!(socket.local_addr().unwrap(), new_address);
            let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
            // More than one receive's worth on the old socket, then one on the new: all arrive.
            for index in 0..40u8 {
                peer.send_to(&[index], old_address).unwrap();
            }
            peer.send_to(b"new", new_address).unwrap();
            let mut received = Vec::new();
            for _ in 0..41 {
                received.push(receive(&socket).await);
            }
            assert!(received.contains(&b"new".to_vec()), "{received:?}");
            let old_ones: Vec<u8> = received
                .iter()
                .filter(|data| data.len() == 1)
                .map(|data| data[0])
                .collect();
            assert_eq!(old_ones, (0..40).collect::<Vec<u8>>());
            // After the grace period the old socket is closed: its port is free again.
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert!(UdpSocket::bind(old_address).is_ok());
            peer.send_to(b"later", new_address).unwrap();
            assert_eq!(receive(&socket).await, b"later");
        });
    }
}

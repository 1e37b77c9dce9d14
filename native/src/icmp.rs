//! ICMP destination-unreachable errors on the engine's UDP sockets.
//!
//! quinn's endpoint socket is unconnected (one socket, many peers), so the kernel reports ICMP
//! errors only to a socket that asked for them: with `IP_RECVERR` / `IPV6_RECVERR` each ICMP
//! error the socket's datagrams drew is queued on the socket's error queue, read with
//! `recvmsg(MSG_ERRQUEUE)`. Its `msg_name` is the destination of the datagram that drew it (the
//! peer address), its `sock_extended_err` says what happened (origin ICMP or ICMPv6, the errno:
//! `ECONNREFUSED` for a port unreachable, `EHOSTUNREACH`, `ENETUNREACH`...) and who said so (the
//! offender: the router or host that sent the ICMP message).
//!
//! [`ErrorQueueSocket`] is a thin wrapper around quinn's own tokio socket (everything QUIC is
//! still quinn's): it enables the option, watches the error queue on a duplicate of the socket's
//! descriptor (an error queue entry raises `EPOLLERR`, which quinn's readable interest never
//! wakes for), reports each unreachable error to a [`Sink`], and keeps the error the kernel also
//! records for the socket (`sk_err`, returned once by the next `recvmsg`) from reaching quinn's
//! endpoint driver, which would stop the endpoint on any receive error but `ECONNRESET`.
//!
//! What the errors mean for a connection is decided in Python (`quicmesh.transport.liveness`):
//! this layer only says which destination was reported unreachable, and why.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{
    self, sockopt, ControlMessageOwned, MsgFlags, SockaddrLike, SockaddrStorage,
};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};
use tokio::io::Interest;
use tokio::sync::Notify;

use crate::hold::HeldDestinations;
use crate::release::SocketHold;

/// The errnos of an ICMP destination unreachable (port, host, network), as the aioquic engine's
/// driver counts them (`quicmesh.transport.quic.connection.UNREACHABLE_ERRNOS`).
pub const UNREACHABLE_ERRNOS: [i32; 4] = [
    libc::ECONNREFUSED,
    libc::EHOSTUNREACH,
    libc::ENETUNREACH,
    libc::EHOSTDOWN,
];

/// Error queue entries read in one go at most (the rest on the next wake-up).
const MAX_READ: usize = 256;

/// Control buffer bytes for one error queue entry (its `sock_extended_err` with the offender,
/// and the `IP_PKTINFO` / `IPV6_PKTINFO`, `IP_TOS` / `IPV6_TCLASS` messages quinn-udp asks for).
const CONTROL_BYTES: usize = 512;

/// Queued socket errors swallowed in one `poll_recv` call at most before yielding.
const MAX_SWALLOWED: usize = 64;

/// One ICMP destination unreachable: the datagram sent to `destination` drew it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreachable {
    /// Where the datagram that drew the error was going (the peer's address).
    pub destination: SocketAddr,
    /// `ECONNREFUSED` (port unreachable), `EHOSTUNREACH`, `ENETUNREACH` or `EHOSTDOWN`.
    pub errno: i32,
    /// What the ICMP message said and who sent it, for logs.
    pub detail: String,
}

/// Where the socket reports unreachable errors (called on the engine's thread, no lock held).
pub type Sink = Arc<dyn Fn(Unreachable) + Send + Sync>;

/// The same address, an IPv4-mapped IPv6 one as plain IPv4 (a dual-stack socket names IPv4
/// peers so): to compare a reported destination with a connection's remote address.
pub fn canonical(address: SocketAddr) -> SocketAddr {
    match address {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => address,
        },
        v4 => v4,
    }
}

/// Ask the kernel to queue ICMP errors on `socket` (`IP_RECVERR`, and `IPV6_RECVERR` on an IPv6
/// socket, whose IPv4-mapped peers' errors need the IPv4 option too).
pub fn enable(socket: &impl AsFd) -> io::Result<()> {
    let ipv6 = nix::sys::socket::getsockname::<SockaddrStorage>(socket.as_fd().as_raw_fd())
        .map(|name| name.family() == Some(socket::AddressFamily::Inet6))
        .map_err(io::Error::from)?;
    if ipv6 {
        socket::setsockopt(socket, sockopt::Ipv6RecvErr, &true).map_err(io::Error::from)?;
        // Best effort: an IPv6-only socket has no IPv4 peers.
        let _ = socket::setsockopt(socket, sockopt::Ipv4RecvErr, &true);
        Ok(())
    } else {
        socket::setsockopt(socket, sockopt::Ipv4RecvErr, &true).map_err(io::Error::from)
    }
}

/// The unreachable errors queued on `fd`'s error queue, which this empties (without waiting).
/// Other entries (local errors, other ICMP messages such as "fragmentation needed") are dropped.
pub fn read_errors(fd: BorrowedFd<'_>) -> Vec<Unreachable> {
    let mut found = Vec::new();
    for _ in 0..MAX_READ {
        // The start of the datagram that drew the error is not needed: its address is enough.
        let mut data = [0u8; 64];
        let mut iov = [IoSliceMut::new(&mut data)];
        // Room for the error and the other messages quinn's socket options add (packet info,
        // TOS / traffic class): a truncated control buffer would hide the error.
        let mut control = [0u8; CONTROL_BYTES];
        let flags = MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT;
        let message = match socket::recvmsg::<SockaddrStorage>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut control),
            flags,
        ) {
            Ok(message) => message,
            Err(Errno::EINTR) => continue,
            Err(_) => break, // EAGAIN: the queue is empty
        };
        let Some(destination) = message.address.as_ref().and_then(std_address) else {
            continue;
        };
        let Ok(messages) = message.cmsgs() else {
            continue;
        };
        for control in messages {
            let (error, offender) = match control {
                ControlMessageOwned::Ipv4RecvErr(error, offender) => {
                    (error, offender.map(|a| IpText::V4(a.sin_addr.s_addr)))
                }
                ControlMessageOwned::Ipv6RecvErr(error, offender) => {
                    (error, offender.map(|a| IpText::V6(a.sin6_addr.s6_addr)))
                }
                _ => continue,
            };
            if let Some(unreachable) = unreachable(destination, &error, offender) {
                found.push(unreachable);
            }
        }
    }
    found
}

/// An offender address as the kernel gives it.
enum IpText {
    /// `sin_addr.s_addr`, in network byte order.
    V4(u32),
    V6([u8; 16]),
}

impl fmt::Display for IpText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IpText::V4(raw) => write!(f, "{}", Ipv4Addr::from(u32::from_be(*raw))),
            IpText::V6(raw) => {
                let ip = Ipv6Addr::from(*raw);
                match ip.to_ipv4_mapped() {
                    Some(v4) => write!(f, "{v4}"),
                    None => write!(f, "{ip}"),
                }
            }
        }
    }
}

/// The unreachable error an error queue entry reports, if it is one.
fn unreachable(
    destination: SocketAddr,
    error: &libc::sock_extended_err,
    offender: Option<IpText>,
) -> Option<Unreachable> {
    let origin = error.ee_origin;
    if origin != libc::SO_EE_ORIGIN_ICMP && origin != libc::SO_EE_ORIGIN_ICMP6 {
        return None; // a local error (e.g. a datagram over the interface's MTU)
    }
    let errno = i32::try_from(error.ee_errno).ok()?;
    if !UNREACHABLE_ERRNOS.contains(&errno) {
        return None; // e.g. EMSGSIZE: fragmentation needed, quinn's MTU discovery copes
    }
    let family = if origin == libc::SO_EE_ORIGIN_ICMP {
        "ICMP"
    } else {
        "ICMPv6"
    };
    let from = offender.map_or_else(String::new, |ip| format!(" from {ip}"));
    Some(Unreachable {
        destination: canonical(destination),
        errno,
        detail: format!(
            "{family} type {} code {}{from}: {}",
            error.ee_type,
            error.ee_code,
            io::Error::from_raw_os_error(errno)
        ),
    })
}

fn std_address(address: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = address.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    address
        .as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// Whether a receive error is the socket's recorded ICMP error (`sk_err`, which the kernel sets
/// with the error queue entry and the next `recvmsg` returns once) rather than a broken socket.
fn queued_socket_error(error: &io::Error) -> bool {
    match error.raw_os_error() {
        Some(code) => ![
            libc::EBADF,
            libc::ENOTSOCK,
            libc::EFAULT,
            libc::EINVAL,
            libc::ENOMEM,
        ]
        .contains(&code),
        None => false,
    }
}

/// The socket's error queue and where its unreachable errors go.
struct ErrorQueue {
    /// A duplicate of the socket's descriptor, registered with tokio on its own (waited on for
    /// `EPOLLERR` alone; nothing is received through it).
    socket: tokio::net::UdpSocket,
    /// Wakes the watcher when a receive met a queued error (in case its wake-up was missed).
    poke: Notify,
    sink: Sink,
    _open: SocketHold,
}

impl ErrorQueue {
    fn drain(&self) {
        for error in read_errors(self.socket.as_fd()) {
            (self.sink)(error);
        }
    }

    /// Read the error queue whenever the socket reports an error, until the socket is dropped.
    async fn watch(self: Arc<Self>) {
        loop {
            tokio::select! {
                ready = self.socket.ready(Interest::ERROR) => match ready {
                    Ok(_) => {
                        // Read until empty, then clear the readiness (unless an error came since).
                        let _ = self.socket.try_io(Interest::ERROR, || {
                            self.drain();
                            Err::<(), _>(io::ErrorKind::WouldBlock.into())
                        });
                    }
                    Err(_) => return,
                },
                () = self.poke.notified() => self.drain(),
            }
        }
    }
}

/// quinn's tokio UDP socket, with ICMP unreachable errors read off its error queue and
/// reported (see the module documentation). Sending and receiving are quinn's own.
pub struct ErrorQueueSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    /// Destinations whose datagrams are held back for a moment ([`crate::hold`]).
    held: Arc<HeldDestinations>,
    /// The error queue and its watcher, where the option could be set.
    queue: Option<(Arc<ErrorQueue>, tokio::task::AbortHandle)>,
    /// Counts the socket open (its descriptor and the queue's duplicate) until both are closed.
    _open: SocketHold,
}

impl ErrorQueueSocket {
    /// Wrap `socket` (bound) for quinn, reporting its unreachable errors to `sink` and counted
    /// open by `open` until closed. Must run in the tokio runtime's context. Where the option
    /// cannot be set, the socket works as before and reports nothing.
    pub fn wrap(
        socket: std::net::UdpSocket,
        sink: Sink,
        open: SocketHold,
        held: Arc<HeldDestinations>,
    ) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        let enabled = enable(&socket).is_ok();
        let duplicate = socket.try_clone()?;
        let inner = quinn::TokioRuntime.wrap_udp_socket(socket)?;
        let queue = if enabled {
            let queue = Arc::new(ErrorQueue {
                socket: tokio::net::UdpSocket::from_std(duplicate)?,
                poke: Notify::new(),
                sink,
                _open: open.clone(),
            });
            let watcher = tokio::spawn(Arc::clone(&queue).watch()).abort_handle();
            Some((queue, watcher))
        } else {
            None
        };
        Ok(Arc::new(ErrorQueueSocket {
            inner,
            held,
            queue,
            _open: open,
        }))
    }

    fn poke(&self) {
        if let Some((queue, _)) = &self.queue {
            queue.poke.notify_one();
        }
    }
}

impl Drop for ErrorQueueSocket {
    fn drop(&mut self) {
        if let Some((_, watcher)) = &self.queue {
            watcher.abort();
        }
    }
}

/// quinn's poller of the wrapped socket, holding the wrapper: the socket (which the poller
/// holds too) is counted open for as long as quinn keeps the poller.
#[derive(Debug)]
struct Poller {
    inner: Pin<Box<dyn UdpPoller>>,
    socket: Arc<ErrorQueueSocket>,
}

impl UdpPoller for Poller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.socket.held.still_holding(cx) {
            return Poll::Pending; // woken when the destination is released
        }
        this.inner.as_mut().poll_writable(cx)
    }
}

impl fmt::Debug for ErrorQueueSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ErrorQueueSocket")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for ErrorQueueSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Poller {
            inner: Arc::clone(&self.inner).create_io_poller(),
            socket: self,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if self.held.holds(transmit.destination) {
            // quinn keeps the datagram and asks the poller, which waits for the release.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        // An ICMP error that arrived since the last send or receive left its errno as the
        // socket's pending error (`sk_err`), and the next `sendmsg` returns that instead of
        // sending, whatever its destination; quinn-udp logs and drops that datagram. After a NAT
        // rebinding this lost, every time, the first packet on the client's new path: the
        // challenge quinn sends to the old address draws a port unreachable just before it, and
        // with the new path's anti-amplification budget spent on the lost packet the path never
        // validated while the peer, hearing nothing, sent too little to refill it. Reading
        // SO_ERROR clears the pending error; the entry stays in the error queue for the watcher.
        if let Some((queue, _)) = &self.queue {
            if let Ok(errno) = socket::getsockopt(&queue.socket, sockopt::SocketError) {
                if errno != 0 {
                    queue.poke.notify_one();
                }
            }
        }
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        for _ in 0..MAX_SWALLOWED {
            match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Ready(Err(error)) if queued_socket_error(&error) => {
                    // The entry itself waits in the error queue: the watcher reports it. Not
                    // here: quinn's endpoint state is locked while it receives.
                    self.poke();
                }
                other => return other,
            }
        }
        cx.waker().wake_by_ref(); // a flood of errors: let other tasks run, then go on
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::OpenSockets;
    use std::net::UdpSocket;
    use std::time::{Duration, Instant};

    /// A UDP port on 127.0.0.1 that nothing listens on (bound, then closed).
    fn closed_port() -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap()
    }

    fn wait_for_errors(socket: &UdpSocket) -> Vec<Unreachable> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let errors = read_errors(socket.as_fd());
            if !errors.is_empty() || Instant::now() > deadline {
                return errors;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_closed_port_is_reported_with_its_address() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        enable(&socket).unwrap();
        let target = closed_port();
        socket.send_to(b"hello", target).unwrap();
        let errors = wait_for_errors(&socket);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].destination, target);
        assert_eq!(errors[0].errno, libc::ECONNREFUSED);
        assert!(
            errors[0].detail.contains("ICMP type 3 code 3"),
            "{errors:?}"
        );
        assert!(
            read_errors(socket.as_fd()).is_empty(),
            "the queue was emptied"
        );
    }

    #[test]
    fn an_ipv6_socket_reports_ipv4_mapped_and_ipv6_peers() {
        let Ok(socket) = UdpSocket::bind("[::]:0") else {
            return; // no IPv6 on this machine
        };
        enable(&socket).unwrap();
        let target = closed_port();
        let mapped = SocketAddr::new(
            match target.ip() {
                std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().into(),
                v6 => v6,
            },
            target.port(),
        );
        socket.send_to(b"hello", mapped).unwrap();
        let errors = wait_for_errors(&socket);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].destination, target, "canonical: plain IPv4");
        if let Ok(v6) = UdpSocket::bind("[::1]:0") {
            let target = v6.local_addr().unwrap();
            drop(v6);
            socket.send_to(b"hello", target).unwrap();
            let errors = wait_for_errors(&socket);
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert_eq!(errors[0].destination, target);
            assert!(errors[0].detail.starts_with("ICMPv6"), "{errors:?}");
        }
    }

    #[test]
    fn without_the_option_nothing_is_queued() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.send_to(b"hello", closed_port()).unwrap();
        // The ICMP error comes back over loopback at once; give it the time anyway.
        std::thread::sleep(Duration::from_millis(50));
        assert!(read_errors(socket.as_fd()).is_empty());
    }

    #[test]
    fn mapped_addresses_compare_as_ipv4() {
        let v4: SocketAddr = "10.1.2.3:443".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:443".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        assert_eq!(canonical(mapped), v4);
        assert_eq!(canonical(v4), v4);
        assert_eq!(canonical(v6), v6);
    }

    #[test]
    fn the_wrapped_socket_reports_and_keeps_receiving() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (sender, mut reports) = tokio::sync::mpsc::unbounded_channel();
            let sink: Sink = Arc::new(move |error| {
                let _ = sender.send(error);
            });
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            let local = socket.local_addr().unwrap();
            let sender_socket = socket.try_clone().unwrap();
            let wrapped = ErrorQueueSocket::wrap(
                socket,
                sink,
                OpenSockets::new().hold(),
                HeldDestinations::new(),
            )
            .unwrap();
            let target = closed_port();
            sender_socket.send_to(b"hello", target).unwrap();
            let report = tokio::time::timeout(Duration::from_secs(5), reports.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(report.destination, target);
            assert_eq!(report.errno, libc::ECONNREFUSED);
            // The socket's recorded error does not reach the receiver: the next datagram does.
            let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
            peer.send_to(b"after", local).unwrap();
            let mut data = [0u8; 1500];
            let mut meta = [RecvMeta::default()];
            let received = std::future::poll_fn(|cx| {
                let mut bufs = [IoSliceMut::new(&mut data)];
                wrapped.poll_recv(cx, &mut bufs, &mut meta)
            });
            let count = tokio::time::timeout(Duration::from_secs(5), received)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(count, 1);
            assert_eq!(&data[..meta[0].len], b"after");
        });
    }

    /// Wait until `socket` has an error pending or queued (`POLLERR`, which reads nothing).
    fn wait_for_pollerr(socket: &UdpSocket) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(socket.as_fd(), PollFlags::empty())];
        let ready = poll(&mut fds, PollTimeout::from(5000u16)).unwrap();
        assert_eq!(ready, 1, "no ICMP error within 5 s");
        assert!(fds[0].revents().unwrap().contains(PollFlags::POLLERR));
    }

    #[test]
    fn a_send_after_an_icmp_error_is_not_lost() {
        // Everything runs without yielding, so the watcher cannot empty the queue first: the
        // pending error is still set when the second datagram is sent.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _entered = rt.enter();
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let probe = socket.try_clone().unwrap();
        let wrapped = ErrorQueueSocket::wrap(
            socket,
            Arc::new(|_| {}),
            OpenSockets::new().hold(),
            HeldDestinations::new(),
        )
        .unwrap();
        // Learn that the socket is writable once; the sends below then never wait.
        let mut poller = Arc::clone(&wrapped).create_io_poller();
        rt.block_on(std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)))
            .unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let send = |destination: SocketAddr, contents: &[u8]| {
            wrapped
                .try_send(&Transmit {
                    destination,
                    ecn: None,
                    contents,
                    segment_size: None,
                    src_ip: None,
                })
                .unwrap();
        };
        send(closed_port(), b"to nobody");
        wait_for_pollerr(&probe);
        send(peer.local_addr().unwrap(), b"to the peer");
        let mut data = [0u8; 64];
        let (count, _) = peer
            .recv_from(&mut data)
            .expect("the datagram after the error");
        assert_eq!(&data[..count], b"to the peer");
    }
}

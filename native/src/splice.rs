//! Splicing: the engine copies a flow between a TCP socket and a QUIC request stream itself.
//!
//! When both ends of a sidecar flow are sockets (the application's or the backend's TCP
//! connection, and a CONNECT stream on this engine), Python hands both over once the CONNECT
//! exchange is done, and sees only the outcome and the byte counts (`Event::Spliced`).
//!
//! Three parts, each small:
//!
//! * [`Deframer`] and [`data_header`]: the thin HTTP/3 layer a CONNECT tunnel needs after its
//!   HEADERS (sans-IO). The payload travels in DATA frames (RFC 9114 7.2.1: type 0x00, a
//!   variable-length integer length, the bytes). Frames of unknown and reserved types are
//!   skipped (RFC 9114 9, 7.2.8); a HEADERS frame after the response is the trailers and ends
//!   the body; a frame type not allowed on a request stream (CANCEL_PUSH, SETTINGS,
//!   PUSH_PROMISE, GOAWAY, MAX_PUSH_ID, HTTP/2's reserved types) or DATA after the trailers is
//!   H3_FRAME_UNEXPECTED; a frame cut by the end of the stream is H3_FRAME_ERROR. Python's
//!   session (aioquic's H3 layer) applies the same rules; either is a connection error (RFC
//!   9114 8.1): the splice fails and the connection is closed with the code
//!   ([`Shared::close_for_violation`]).
//! * [`FdInbox`]: how a TCP socket crosses from Python without `unsafe`: Python sends its
//!   descriptor over a Unix socket pair (SCM_RIGHTS), rustix's safe `recvmsg` hands it back as
//!   an `OwnedFd`.
//! * [`run`]: the copy itself on the engine's tokio thread, without the GIL. Each direction
//!   moves one bounded chunk (64 KiB) at a time and reads its source only once the previous
//!   chunk was taken by its sink, so read-driven backpressure stays: QUIC stream credit opens
//!   only as the TCP peer reads, and the TCP peer's window only as quinn takes bytes within
//!   the QUIC peer's credit. Bytes Python already held go first, in order: what Python had
//!   queued on the stream (already framed), then what it had read from TCP and not yet sent,
//!   then the socket; and, the other way, the payload it had received and not yet written,
//!   then the unparsed HTTP/3 bytes it had, then quinn's.
//!
//! Semantics are the Python pump's (`quicmesh.splice.splice`): EOF each way is a half-close
//! (TCP FIN -> QUIC FIN; QUIC FIN -> `shutdown(SHUT_WR)`); a failure resets both sides: the
//! stream with RESET_STREAM and STOP_SENDING (the peer's code when it reset, H3_CONNECT_ERROR
//! for a TCP error, H3_REQUEST_CANCELLED when Python aborts) and the TCP connection with RST
//! (SO_LINGER 0). A splice reports its end only once the peer acknowledged every byte it
//! sent (quinn's `stopped()` after `finish()`), so a drain closing the connection next loses
//! nothing. The connection's end is not a failure by itself: what quinn received for the
//! flow before the peer's close is still written to the socket (with the FIN if it came),
//! and a peer that closes without an error after our FIN went out counts as having it all
//! (its close can overtake its acknowledgement). A close before our FIN, with an error
//! before the acknowledgement, or one that cut the peer's bytes before its FIN fails the
//! flow as before.

use std::collections::VecDeque;
use std::io::{ErrorKind, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use quinn::{
    Connection, ConnectionError, ReadError, RecvStream, SendStream, StoppedError,
    TransportErrorCode, VarInt, WriteError,
};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::engine::{lock, Event, RecvEnd, RecvHandover, SendCmd, Shared};

/// H3_NO_ERROR: a STOP_SENDING with it only says "no more bytes needed" (RFC 9114 4.1.1).
pub const H3_NO_ERROR: u64 = 0x100;
/// H3_FRAME_UNEXPECTED (RFC 9114 8.1).
pub const H3_FRAME_UNEXPECTED: u64 = 0x105;
/// H3_FRAME_ERROR: a malformed frame, e.g. one cut by the end of the stream.
pub const H3_FRAME_ERROR: u64 = 0x106;
/// H3_REQUEST_CANCELLED: the flow was abandoned (Python's abort).
pub const H3_REQUEST_CANCELLED: u64 = 0x10c;
/// H3_CONNECT_ERROR: the TCP side of the CONNECT failed (RFC 9114 4.4).
pub const H3_CONNECT_ERROR: u64 = 0x10f;

const DATA: u64 = 0x00;
const HEADERS: u64 = 0x01;

/// The most bytes one direction holds at a time.
pub const CHUNK: usize = 64 * 1024;

/// Room kept in front of each chunk read from TCP for its DATA frame header.
const HEADER_ROOM: usize = 9;

/// The most a flow's first read from TCP takes: most flows' requests and answers fit, and
/// one that fills it reads up to [`CHUNK`] at a time from then on. Room for a whole chunk
/// for every flow was a fresh 64 KiB allocation a flow (page faults, then the heap trimmed
/// when it was freed: 2.5 % of the engine's CPU a new flow, measured with perf).
const FIRST_READ: usize = 4096;

/// Whether a frame type may not appear on a request stream (RFC 9114 7.2.3-7.2.8: CANCEL_PUSH,
/// SETTINGS, PUSH_PROMISE (no push is ever allowed), GOAWAY, MAX_PUSH_ID, and the types
/// reserved for HTTP/2's frames).
fn unexpected_on_request_stream(frame_type: u64) -> bool {
    matches!(frame_type, 0x02..=0x09 | 0x0d)
}

/// A violation of the framing rules: the stream error code and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub code: u64,
    pub message: String,
}

fn frame_error(code: u64, message: impl Into<String>) -> FrameError {
    FrameError {
        code,
        message: message.into(),
    }
}

/// Decode one QUIC variable-length integer (RFC 9000 16) from the front of `bytes`:
/// `Some((value, length))`, or `None` while incomplete.
pub fn decode_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let first = *bytes.first()?;
    let length = 1usize << (first >> 6);
    if bytes.len() < length {
        return None;
    }
    let mut value = u64::from(first & 0x3f);
    for byte in &bytes[1..length] {
        value = (value << 8) | u64::from(*byte);
    }
    Some((value, length))
}

/// Encode `value` (below 2^62) as a QUIC variable-length integer, shortest form.
pub fn encode_varint(value: u64, out: &mut Vec<u8>) {
    if value < 1 << 6 {
        out.push(value as u8);
    } else if value < 1 << 14 {
        out.extend_from_slice(&((value as u16) | 0x4000).to_be_bytes());
    } else if value < 1 << 30 {
        out.extend_from_slice(&((value as u32) | 0x8000_0000).to_be_bytes());
    } else {
        out.extend_from_slice(&(value | 0xc000_0000_0000_0000).to_be_bytes());
    }
}

/// The header of a DATA frame carrying `length` bytes (type 0x00, then the length).
pub fn data_header(length: usize) -> Vec<u8> {
    let mut header = vec![DATA as u8];
    encode_varint(length as u64, &mut header);
    header
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading a frame header (type and length), `header` holds what arrived of it.
    Header,
    /// Inside a DATA frame: this many payload bytes still to come.
    Data(u64),
    /// Inside a frame that is skipped (unknown type, trailers): this many bytes to drop.
    Skip(u64),
}

/// The request stream's frames after the CONNECT's HEADERS, turned back into the flow's bytes.
#[derive(Debug, Clone)]
pub struct Deframer {
    phase: Phase,
    header: Vec<u8>,
    trailers: bool,
}

impl Default for Deframer {
    fn default() -> Self {
        Self::new()
    }
}

impl Deframer {
    /// A deframer at a frame boundary.
    pub fn new() -> Self {
        Deframer {
            phase: Phase::Header,
            header: Vec::new(),
            trailers: false,
        }
    }

    /// A deframer taking over mid-frame from another parser: inside a frame of `frame_type`
    /// with `remaining` bytes of it still to come (`None`: at a frame boundary).
    pub fn resume(frame_type: Option<u64>, remaining: u64) -> Result<Self, FrameError> {
        let mut deframer = Deframer::new();
        if let Some(frame_type) = frame_type {
            deframer.start_frame(frame_type, remaining)?;
        }
        Ok(deframer)
    }

    fn start_frame(&mut self, frame_type: u64, length: u64) -> Result<(), FrameError> {
        if frame_type == DATA {
            if self.trailers {
                return Err(frame_error(
                    H3_FRAME_UNEXPECTED,
                    "DATA frame after the trailers",
                ));
            }
            self.phase = if length == 0 {
                Phase::Header
            } else {
                Phase::Data(length)
            };
        } else if frame_type == HEADERS {
            if self.trailers {
                return Err(frame_error(
                    H3_FRAME_UNEXPECTED,
                    "HEADERS frame after the trailers",
                ));
            }
            // Trailers: a tunnel carries none; they end the body (the FIN follows).
            self.trailers = true;
            self.phase = if length == 0 {
                Phase::Header
            } else {
                Phase::Skip(length)
            };
        } else if unexpected_on_request_stream(frame_type) {
            return Err(frame_error(
                H3_FRAME_UNEXPECTED,
                format!("frame type {frame_type:#x} is not allowed on a request stream"),
            ));
        } else {
            self.phase = if length == 0 {
                Phase::Header
            } else {
                Phase::Skip(length)
            };
        }
        Ok(())
    }

    /// Feed the stream's next bytes; the payload they carry is appended to `out` (slices of
    /// `input`, no copy).
    pub fn feed(&mut self, mut input: Bytes, out: &mut Vec<Bytes>) -> Result<(), FrameError> {
        while !input.is_empty() {
            match self.phase {
                Phase::Data(left) => {
                    let take = input.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    out.push(input.split_to(take));
                    let left = left - take as u64;
                    self.phase = if left == 0 {
                        Phase::Header
                    } else {
                        Phase::Data(left)
                    };
                }
                Phase::Skip(left) => {
                    let take = input.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let _ = input.split_to(take);
                    let left = left - take as u64;
                    self.phase = if left == 0 {
                        Phase::Header
                    } else {
                        Phase::Skip(left)
                    };
                }
                Phase::Header => {
                    // At most 16 header bytes: take one at a time until both integers parse.
                    self.header.push(input[0]);
                    let _ = input.split_to(1);
                    let Some((frame_type, used)) = decode_varint(&self.header) else {
                        continue;
                    };
                    let Some((length, _)) = decode_varint(&self.header[used..]) else {
                        continue;
                    };
                    self.header.clear();
                    self.start_frame(frame_type, length)?;
                }
            }
        }
        Ok(())
    }

    /// The stream ended (FIN): an error if it cut a frame.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.phase == Phase::Header && self.header.is_empty() {
            Ok(())
        } else {
            Err(frame_error(
                H3_FRAME_ERROR,
                "frame truncated by the end of the stream",
            ))
        }
    }
}

/// Where TCP sockets handed over by Python arrive: a Unix datagram socket pair; Python sends
/// each descriptor with SCM_RIGHTS on one end (with a token), [`FdInbox::take`] receives it.
#[derive(Debug)]
pub struct FdInbox {
    sender: UnixDatagram,
    receiver: UnixDatagram,
    lock: Mutex<()>,
}

impl FdInbox {
    /// The process's inbox.
    pub fn get() -> Result<&'static FdInbox, String> {
        static INBOX: OnceLock<Result<FdInbox, String>> = OnceLock::new();
        INBOX
            .get_or_init(|| {
                let (sender, receiver) =
                    UnixDatagram::pair().map_err(|e| format!("cannot create the fd inbox: {e}"))?;
                receiver
                    .set_nonblocking(true)
                    .map_err(|e| format!("cannot create the fd inbox: {e}"))?;
                Ok(FdInbox {
                    sender,
                    receiver,
                    lock: Mutex::new(()),
                })
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The descriptor Python sends on (Python duplicates it to own its copy).
    pub fn sender_fd(&self) -> i32 {
        self.sender.as_raw_fd()
    }

    /// Receive the descriptor sent (already, by the caller's thread) with `token`.
    ///
    /// Descriptors with another token ahead of it were left by calls that failed before
    /// they took theirs (their callers were told), or, with event loops in two threads,
    /// sent by the other thread between this one's send and take (that caller then fails
    /// as before): they are closed and skipped. (Taken as this call's, each left behind
    /// made every later splice in the process fail.)
    pub fn take(&self, token: u64) -> Result<OwnedFd, String> {
        let _serial = lock(&self.lock);
        loop {
            let mut payload = [0u8; 8];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
            let received = rustix::net::recvmsg(
                &self.receiver,
                &mut [IoSliceMut::new(&mut payload)],
                &mut control,
                rustix::net::RecvFlags::DONTWAIT | rustix::net::RecvFlags::CMSG_CLOEXEC,
            )
            .map_err(|e| format!("no socket was handed over: {e}"))?;
            let mut fds: Vec<OwnedFd> = Vec::new();
            for message in control.drain() {
                if let rustix::net::RecvAncillaryMessage::ScmRights(rights) = message {
                    fds.extend(rights);
                }
            }
            if received.bytes != 8 || u64::from_le_bytes(payload) != token {
                continue; // a failed call's: its descriptors close here
            }
            return match fds.len() {
                1 => Ok(fds.remove(0)),
                n => Err(format!("{n} descriptors handed over for one splice")),
            };
        }
    }

    /// Send `fd` with `token` (what Python does with `socket.send_fds`; for tests).
    pub fn send(&self, token: u64, fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
        let fds = [fd];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
        control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds));
        rustix::net::sendmsg(
            &self.sender,
            &[IoSlice::new(&token.to_le_bytes())],
            &mut control,
            rustix::net::SendFlags::empty(),
        )?;
        Ok(())
    }
}

/// What Python handed over with the socket.
#[derive(Debug)]
pub struct SpliceSpec {
    pub id: u64,
    pub conn: u64,
    pub stream: u64,
    /// Payload received on the stream that Python had not written to TCP yet.
    pub to_tcp: Bytes,
    /// Bytes read from TCP that Python had not written to the stream yet (sent framed).
    pub to_quic: Bytes,
    /// Stream bytes Python received and had not parsed yet (fed to the deframer first).
    pub unparsed: Bytes,
    pub deframer: Deframer,
    /// The stream's FIN was already received (by Python).
    pub recv_fin: bool,
    /// The stream bytes Python saw, when it handed the receiving half over without pausing
    /// it (what else the half gave is deframed after `unparsed`).
    pub received: Option<u64>,
}

/// What the engine keeps about a running splice: where Python's abort goes and what it holds.
#[derive(Debug)]
pub struct SpliceHandle {
    pub abort: oneshot::Sender<u64>,
    pub held: Arc<Held>,
}

/// The bytes a splice holds in memory, each way (at most a chunk or two each: a direction
/// reads its source only after its sink took the previous chunk), the bytes it moved so far,
/// and when bytes last moved.
#[derive(Debug)]
pub struct Held {
    /// Read from TCP (or handed over by Python) and not yet taken by quinn.
    to_quic: AtomicU64,
    /// Received from quinn (or handed over by Python) and not yet written to TCP.
    to_tcp: AtomicU64,
    /// Payload read from TCP (or handed over by Python) for the stream so far: the
    /// `spliced` event's `sent` once the flow ends.
    sent: AtomicU64,
    /// Payload written to TCP so far: the `spliced` event's `received`.
    received: AtomicU64,
    /// The flow's idle timeout (Envoy's `tcp_proxy` `idle_timeout`): reset both ways once no
    /// byte moved either way for this long. None: never.
    idle_timeout: Option<Duration>,
    started: Instant,
    /// Milliseconds from `started` to the last time a byte was read or written either way.
    last_moved: AtomicU64,
}

impl Held {
    pub fn new(idle_timeout: Option<Duration>) -> Self {
        Held {
            to_quic: AtomicU64::new(0),
            to_tcp: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            idle_timeout,
            started: Instant::now(),
            last_moved: AtomicU64::new(0),
        }
    }

    pub fn total(&self) -> u64 {
        self.to_quic.load(Ordering::Relaxed) + self.to_tcp.load(Ordering::Relaxed)
    }

    /// The payload moved so far, (sent on the stream, written to TCP): what a flow's
    /// counters show while it runs (Envoy counts bytes as they move, not at a flow's end).
    pub fn moved_so_far(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }

    /// Bytes moved (read or written, either way): the idle timeout starts again.
    fn moved(&self) {
        let since = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_moved.store(since, Ordering::Relaxed);
    }

    /// Resolves once no byte moved for the idle timeout (never without one).
    async fn idle(&self) -> Failure {
        let Some(limit) = self.idle_timeout else {
            return std::future::pending().await;
        };
        loop {
            let last = Duration::from_millis(self.last_moved.load(Ordering::Relaxed));
            let deadline = self.started + last + limit;
            if Instant::now() >= deadline {
                return Failure::Idle(limit);
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

fn total_len(chunks: &[Bytes]) -> u64 {
    chunks.iter().map(|chunk| chunk.len() as u64).sum()
}

/// A stream's sending half as its task hands it over, with the bytes it had not sent yet.
pub type SendHandover = (SendStream, VecDeque<Bytes>);

/// Why a spliced flow failed.
#[derive(Debug)]
enum Failure {
    Tcp(std::io::Error),
    PeerReset(u64),
    PeerStopped(u64),
    Frame(FrameError),
    Quic(String),
    Aborted(u64),
    /// No byte moved either way for the flow's idle timeout.
    Idle(Duration),
}

impl Failure {
    /// The code the stream is reset with, both ways (none when the connection is gone).
    fn code(&self) -> u64 {
        match self {
            Failure::Tcp(_) => H3_CONNECT_ERROR,
            Failure::PeerReset(code) | Failure::PeerStopped(code) | Failure::Aborted(code) => *code,
            Failure::Frame(error) => error.code,
            Failure::Quic(_) | Failure::Idle(_) => H3_REQUEST_CANCELLED,
        }
    }

    /// What happened, for the flow's end; `opened_here`: whether this side opened the
    /// stream (H3_CONNECT_ERROR from the peer then means its destination failed, else
    /// that the peer's client reset its TCP connection, as `_session.py` says it).
    fn describe(&self, stream: u64, opened_here: bool) -> String {
        match self {
            Failure::Tcp(error) => match error.raw_os_error() {
                Some(errno) => format!(
                    "[Errno {errno}] {}",
                    error.to_string().split(" (os error").next().unwrap_or("")
                ),
                None => error.to_string(),
            },
            Failure::PeerReset(code) | Failure::PeerStopped(code) => {
                let kind = match self {
                    _ if *code == H3_CONNECT_ERROR && opened_here => "destination TCP reset",
                    _ if *code == H3_CONNECT_ERROR => "client TCP reset",
                    Failure::PeerStopped(_) => "stopped (STOP_SENDING)",
                    _ => "reset",
                };
                format!("stream {stream} {kind} by peer (error code {code:#x})")
            }
            Failure::Frame(error) => format!("stream {stream}: {}", error.message),
            Failure::Quic(message) => format!("connection lost: {message}"),
            Failure::Aborted(code) => format!("stream {stream} aborted locally ({code:#x})"),
            Failure::Idle(limit) => format!(
                "idle timeout: no bytes either way for {}s",
                limit.as_secs_f64()
            ),
        }
    }
}

/// Whether this side of `connection` opened `stream` (a QUIC stream ID's lowest bit
/// names its initiator: 0 the client, RFC 9000 2.1).
fn opened_here(connection: &Connection, stream: u64) -> bool {
    (stream & 1 == 0) == connection.side().is_client()
}

/// The flow's failure for its connection's end, worded as the connection's own close is
/// (`engine::classify`: quinn writes an application close's code bare, in decimal, and a
/// read's or a write's loss of the connection as "connection lost: connection lost").
fn lost(error: &ConnectionError) -> Failure {
    Failure::Quic(crate::engine::classify(error).1)
}

/// Whether the peer closed the connection without an error (an application close with
/// H3_NO_ERROR or quicmesh's 0, or a transport close with NO_ERROR): what it was sent
/// before the close counts as delivered.
pub fn closed_gracefully(error: &ConnectionError) -> bool {
    match error {
        ConnectionError::ApplicationClosed(close) => {
            matches!(close.error_code.into_inner(), 0 | H3_NO_ERROR)
        }
        ConnectionError::ConnectionClosed(close) => {
            close.error_code == TransportErrorCode::NO_ERROR
        }
        _ => false,
    }
}

/// What the peer's STOP_SENDING with `code` means for the TCP -> QUIC direction, heard at
/// a write or while the TCP side was quiet: with H3_NO_ERROR the peer needs no more bytes
/// (RFC 9114 4.1.1) and what comes is dropped until the local side closes, as the Python
/// pump does (Ok); with an error the flow fails, both sides reset with the peer's code.
fn peer_stopped(code: VarInt) -> Result<(), Failure> {
    match code.into_inner() {
        H3_NO_ERROR => Ok(()),
        code => Err(Failure::PeerStopped(code)),
    }
}

/// Read the next chunk (at most `limit` bytes, raised to [`CHUNK`] once a read fills it)
/// from `tcp` as one DATA frame: its payload length and the frame, or `None` at EOF.
///
/// The frame is read into `buffer`'s spare capacity after room for its header, never
/// zeroed (tokio's `try_read_buf` writes the uninitialised bytes safely; a 64 KiB memset
/// per read was the engine's largest cost per keep-alive request), then split off: the
/// frames sent before share the allocation until quinn drops them (acknowledged), and it
/// is reused after; a new one is made only when they hold too much of it (bulk: each read
/// fills a chunk).
async fn read_data_frame(
    tcp: &TcpStream,
    buffer: &mut BytesMut,
    limit: &mut usize,
) -> std::io::Result<Option<(usize, Bytes)>> {
    buffer.reserve(HEADER_ROOM + *limit);
    buffer.put_bytes(0, HEADER_ROOM);
    let read = loop {
        tcp.readable().await?;
        match tcp.try_read_buf(&mut (&mut *buffer).limit(*limit)) {
            Err(error) if error.kind() == ErrorKind::WouldBlock => continue,
            result => break result?,
        }
    };
    if read == 0 {
        buffer.clear();
        return Ok(None);
    }
    if read == *limit {
        *limit = CHUNK;
    }
    let header = data_header(read);
    let start = HEADER_ROOM - header.len();
    buffer[start..HEADER_ROOM].copy_from_slice(&header);
    Ok(Some((read, buffer.split().freeze().slice(start..))))
}

/// Write all of `data`; `held` hears of each part the socket took (a slow reader that
/// takes a little at a time keeps the flow from being idle).
async fn write_tcp(tcp: &TcpStream, mut data: &[u8], held: &Held) -> std::io::Result<()> {
    while !data.is_empty() {
        tcp.writable().await?;
        match tcp.try_write(data) {
            Ok(written) => {
                data = &data[written..];
                held.moved();
            }
            Err(error) if error.kind() == ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// QUIC FIN -> `shutdown(SHUT_WR)`, where a peer that closed first is no failure.
///
/// A TCP peer that closed its connection in order (its FIN came) answers the bytes written
/// to it after with RST, and the socket is no longer connected: `shutdown` fails with
/// ENOTCONN, the socket's pending error being EPIPE (Linux's `tcp_reset` in CLOSE_WAIT, the
/// FIN before the RST). The peer said all it would and closed: nothing is left to close, as
/// the Python pump's half-close (asyncio's `write_eof`, whose error uvloop drops) and
/// Envoy's `tcp_proxy` end it (a review: the native engine alone logged such a flow
/// `reset`, "[Errno 107] Transport endpoint is not connected"). A peer that reset its
/// connection without a FIN first leaves ECONNRESET pending: that fails the flow, named.
/// (A write that meets EPIPE fails the flow, as in the Python pump: that is
/// [`write_tcp`]'s.)
fn shut_write(socket: socket2::SockRef<'_>) -> std::io::Result<()> {
    match socket.shutdown(Shutdown::Write) {
        Err(error) if error.kind() == ErrorKind::NotConnected => match socket.take_error() {
            Ok(Some(pending)) if pending.kind() == ErrorKind::BrokenPipe => Ok(()),
            Ok(Some(pending)) => Err(pending),
            Ok(None) | Err(_) => Err(error),
        },
        result => result,
    }
}

/// The socket's error, once it has one (a reset from its peer): readiness for errors
/// alone, so data waiting to be read and the peer's FIN do not wake it.
async fn tcp_failed(tcp: &TcpStream) -> std::io::Error {
    match tcp.ready(Interest::ERROR).await {
        Ok(_) => match tcp.take_error() {
            Ok(Some(error)) => error,
            // (Taken already by the other direction's read or write, which fails too.)
            Ok(None) => ErrorKind::ConnectionReset.into(),
            Err(error) => error,
        },
        Err(error) => error,
    }
}

/// quinn's `write_all_chunks`, telling `held` of each part the stream took (a peer that
/// gives credit a little at a time keeps the flow from being idle).
async fn write_all_chunks(
    send: &mut SendStream,
    mut chunks: &mut [Bytes],
    held: &Held,
) -> Result<(), WriteError> {
    while !chunks.is_empty() {
        let written = send.write_chunks(chunks).await?;
        chunks = &mut chunks[written.chunks..];
        if written.bytes > 0 {
            held.moved();
        }
    }
    Ok(())
}

/// TCP -> QUIC: what the stream's task had queued, then Python's bytes, then the socket's,
/// each chunk as one DATA frame; TCP EOF -> FIN. Counts the payload in `held.sent`.
///
/// Done once the peer acknowledged every byte and the FIN, or closed the connection
/// without an error after the FIN was sent. A connection that ends before the FIN went out
/// fails this direction (what the TCP side still sends can no longer be carried), as does
/// one that ends with an error before the acknowledgement.
async fn upstream(
    tcp: &TcpStream,
    connection: &Connection,
    send: Option<&mut SendHandover>,
    prefix: Bytes,
    held: &Held,
) -> Result<(), Failure> {
    let Some((send, queued)) = send else {
        return Err(Failure::Quic("the stream can no longer send".into()));
    };
    let mut discard = false;
    let mut watching = true;
    let (mut buffer, mut limit) = (BytesMut::new(), FIRST_READ);
    let mut pending: Vec<Bytes> = queued.drain(..).collect();
    if !prefix.is_empty() {
        held.sent.fetch_add(prefix.len() as u64, Ordering::Relaxed);
        pending.push(Bytes::from(data_header(prefix.len())));
        pending.push(prefix);
    }
    loop {
        held.to_quic.store(total_len(&pending), Ordering::Relaxed);
        if !pending.is_empty() && !discard {
            // While the stream waits for the peer's credit, the socket is not read: its
            // reset is heard here, or it would wait for the credit (a stalled reader at
            // the other end: up to the flow's idle timeout).
            let written = tokio::select! {
                written = write_all_chunks(send, &mut pending[..], held) => written,
                error = tcp_failed(tcp) => return Err(Failure::Tcp(error)),
            };
            match written {
                Ok(()) => {}
                Err(WriteError::Stopped(code)) => {
                    peer_stopped(code)?;
                    let _ = send.reset(code); // RFC 9000 3.5: RESET_STREAM answers it
                    discard = true;
                }
                Err(WriteError::ConnectionLost(error)) => return Err(lost(&error)),
                Err(error) => return Err(Failure::Quic(error.to_string())),
            }
        }
        pending.clear();
        held.to_quic.store(0, Ordering::Relaxed);
        // The peer's STOP_SENDING is heard while the TCP side is quiet too, not only at
        // the next write.
        let stopped = send.stopped();
        let frame = tokio::select! {
            frame = read_data_frame(tcp, &mut buffer, &mut limit) => frame.map_err(Failure::Tcp)?,
            error = connection.closed() => return Err(lost(&error)),
            stopped = stopped, if !discard && watching => match stopped {
                Ok(Some(code)) => {
                    peer_stopped(code)?;
                    let _ = send.reset(code); // RFC 9000 3.5: RESET_STREAM answers it
                    discard = true;
                    continue;
                }
                Ok(None) => {
                    watching = false; // finished and acknowledged: not before our FIN
                    continue;
                }
                Err(StoppedError::ConnectionLost(error)) => return Err(lost(&error)),
                Err(error) => return Err(Failure::Quic(error.to_string())),
            },
        };
        let Some((read, frame)) = frame else {
            if discard {
                return Ok(());
            }
            if let Some(error) = connection.close_reason() {
                return Err(lost(&error));
            }
            if send.finish().is_ok() {
                // Done once the peer acknowledged every byte (not merely once quinn took
                // them): a drain that closes the connection next loses nothing. A peer
                // that closes the connection without an error once it has read the end
                // (its close may overtake its acknowledgement) got every byte too.
                match send.stopped().await {
                    Err(StoppedError::ConnectionLost(error)) if !closed_gracefully(&error) => {
                        return Err(lost(&error));
                    }
                    Err(StoppedError::ZeroRttRejected) => {
                        return Err(Failure::Quic("0-RTT rejected".into()));
                    }
                    _ => {}
                }
            }
            return Ok(());
        };
        held.sent.fetch_add(read as u64, Ordering::Relaxed);
        held.moved();
        pending.push(frame);
    }
}

/// QUIC -> TCP: Python's payload, then the unparsed bytes, then quinn's, deframed; QUIC FIN
/// -> `shutdown(SHUT_WR)`. Reads quinn only once the previous chunk reached the socket.
///
/// The connection's end does not stop it: quinn keeps what it received in order readable
/// after the close (at most the receive window), so this direction writes it all to the
/// socket and ends with the FIN if it came; a close that cut the stream before its FIN
/// fails it once the bytes before the cut are written (quinn's `ConnectionLost`).
async fn downstream(
    tcp: &TcpStream,
    recv: Option<&mut RecvStream>,
    prefix: Bytes,
    unparsed: Vec<Bytes>,
    deframer: &mut Deframer,
    recv_fin: bool,
    held: &Held,
) -> Result<(), Failure> {
    let mut payload = vec![prefix];
    for bytes in unparsed {
        deframer.feed(bytes, &mut payload).map_err(Failure::Frame)?;
    }
    let mut fin = recv_fin;
    let mut recv = recv;
    loop {
        held.to_tcp.store(total_len(&payload), Ordering::Relaxed);
        for chunk in payload.drain(..) {
            if !chunk.is_empty() {
                write_tcp(tcp, &chunk, held).await.map_err(Failure::Tcp)?;
                held.received
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                held.to_tcp.fetch_sub(chunk.len() as u64, Ordering::Relaxed);
            }
        }
        if fin {
            deframer.finish().map_err(Failure::Frame)?;
            shut_write(socket2::SockRef::from(tcp)).map_err(Failure::Tcp)?;
            return Ok(());
        }
        let Some(stream) = recv.as_deref_mut() else {
            return Err(Failure::Quic("the stream can no longer be read".into()));
        };
        match stream.read_chunk(CHUNK, true).await {
            Ok(Some(chunk)) => {
                held.moved();
                deframer
                    .feed(chunk.bytes, &mut payload)
                    .map_err(Failure::Frame)?
            }
            Ok(None) => fin = true,
            Err(ReadError::Reset(code)) => return Err(Failure::PeerReset(code.into_inner())),
            Err(ReadError::ConnectionLost(error)) => return Err(lost(&error)),
            Err(error) => return Err(Failure::Quic(error.to_string())),
        }
    }
}

/// Copy a flow both ways until both directions ended or one failed, then report it
/// (`Event::Spliced`). `abort` carries a code from Python to fail the flow.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    shared: Arc<Shared>,
    spec: SpliceSpec,
    held: Arc<Held>,
    tcp: TcpStream,
    connection: Connection,
    send: Option<oneshot::Receiver<SendHandover>>,
    recv: Option<oneshot::Receiver<RecvHandover>>,
    abort: oneshot::Receiver<u64>,
) {
    let SpliceSpec {
        id,
        conn,
        stream,
        to_tcp,
        to_quic,
        unparsed,
        deframer,
        mut recv_fin,
        received,
    } = spec;
    let send = match send {
        Some(handover) => handover.await.ok(),
        None => None,
    };
    let mut unparsed = vec![unparsed];
    let mut failed: Option<Failure> = None;
    let recv = match recv {
        Some(handover) => match handover.await {
            Ok(RecvHandover { recv, log, end }) => {
                if let Some(received) = received {
                    match log.unseen(received) {
                        Ok(unseen) => unparsed.extend(unseen),
                        Err(message) => failed = Some(Failure::Quic(message)),
                    }
                }
                match end {
                    Some(RecvEnd::Fin) => recv_fin = true,
                    Some(RecvEnd::Reset(code)) => {
                        failed.get_or_insert(Failure::PeerReset(code));
                    }
                    Some(RecvEnd::Stopped) | None => {}
                }
                recv
            }
            Err(_) => None,
        },
        None => None,
    };
    let halves = Halves {
        send,
        recv,
        unparsed,
        recv_fin,
        failed,
    };
    carry(
        shared, id, conn, stream, to_tcp, to_quic, deframer, held, tcp, connection, halves, abort,
    )
    .await;
}

/// A flow's stream halves as a splice starts with them, and what they already say.
pub struct Halves {
    pub send: Option<SendHandover>,
    pub recv: Option<RecvStream>,
    /// Stream bytes received and not parsed yet (fed to the deframer first).
    pub unparsed: Vec<Bytes>,
    /// The stream's FIN was already received.
    pub recv_fin: bool,
    failed: Option<Failure>,
}

impl Halves {
    /// Halves taken straight from quinn (a stream the engine opened and has not read past
    /// `unparsed`).
    pub fn opened(send: SendStream, recv: RecvStream, unparsed: Bytes) -> Self {
        Halves {
            send: Some((send, VecDeque::new())),
            recv: Some(recv),
            unparsed: vec![unparsed],
            recv_fin: false,
            failed: None,
        }
    }
}

impl Halves {
    /// Halves of a flow given up before its splice began: the splice resets both sides
    /// with `code` and reports the abort.
    pub fn aborted(send: SendStream, recv: RecvStream, code: u64) -> Self {
        Halves {
            failed: Some(Failure::Aborted(code)),
            ..Halves::opened(send, recv, Bytes::new())
        }
    }
}

/// The copy itself, once the halves are in hand ([`run`]).
#[allow(clippy::too_many_arguments)]
pub async fn carry(
    shared: Arc<Shared>,
    id: u64,
    conn: u64,
    stream: u64,
    to_tcp: Bytes,
    to_quic: Bytes,
    mut deframer: Deframer,
    held: Arc<Held>,
    tcp: TcpStream,
    connection: Connection,
    halves: Halves,
    abort: oneshot::Receiver<u64>,
) {
    let Halves {
        mut send,
        mut recv,
        unparsed,
        recv_fin,
        failed,
    } = halves;
    // The idle timeout runs from the splice's start (not from the connect or the CONNECT
    // exchange before it, which have their own timeout).
    held.moved();
    let aborted = async {
        match abort.await {
            Ok(code) => code,
            Err(_) => std::future::pending().await,
        }
    };
    let result = {
        let up = upstream(&tcp, &connection, send.as_mut(), to_quic, &held);
        let down = downstream(
            &tcp,
            recv.as_mut(),
            to_tcp,
            unparsed,
            &mut deframer,
            recv_fin,
            &held,
        );
        let both = async { tokio::try_join!(up, down).map(|_| ()) };
        // The connection's close is each direction's business (above): what quinn still
        // holds for the flow is written to the socket first, and a peer's close without
        // an error after the last byte is no failure.
        match failed {
            Some(failure) => Err(failure),
            None => tokio::select! {
                result = both => result,
                code = aborted => Err(Failure::Aborted(code)),
                failure = held.idle() => Err(failure),
            },
        }
    };
    let (error, code) = match &result {
        Ok(()) => (String::new(), 0),
        Err(failure) => {
            let code = failure.code();
            let code_varint = VarInt::from_u64(code).unwrap_or(VarInt::from_u32(0x10c));
            if let Some((send, _)) = send.as_mut() {
                let _ = send.reset(code_varint);
            }
            if let Some(recv) = recv.as_mut() {
                let _ = recv.stop(code_varint);
            }
            // RST, so the local peer sees the failure rather than a clean end.
            let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
            if let Failure::Frame(error) = failure {
                // RFC 9114 8.1: a frame the request stream may not carry, or one cut short,
                // is a connection error, as Python's session makes it.
                let reason = failure.describe(stream, opened_here(&connection, stream));
                shared.close_for_violation(conn, &connection, error.code, &reason);
            }
            (
                failure.describe(stream, opened_here(&connection, stream)),
                code,
            )
        }
    };
    drop(tcp);
    lock(&shared.splices).remove(&id);
    let (sent, received) = held.moved_so_far();
    shared.stream_ended(conn, stream);
    shared.push(Event::Spliced {
        id,
        conn,
        stream,
        sent,
        received,
        error,
        code,
        connected: true,
    });
}

/// Stop a stream's receiving half handed over for a splice, once its task gives it.
async fn stop_when_given(handover: oneshot::Receiver<RecvHandover>, code: VarInt) {
    if let Ok(RecvHandover {
        recv: Some(mut recv),
        ..
    }) = handover.await
    {
        let _ = recv.stop(code);
    }
}

/// (splicing) A receiving half handed over for a splice that will not start: stop it with
/// `code` once its task gives it (dropped, quinn would send STOP_SENDING 0, not an HTTP/3
/// code, or keep it until the connection ends if the task still holds it).
pub fn stop_handed_over(handover: Option<oneshot::Receiver<RecvHandover>>, code: VarInt) {
    if let (Some(handover), Ok(rt)) = (handover, crate::engine::runtime()) {
        rt.spawn(stop_when_given(handover, code));
    }
}

/// (splicing) Where a `connect_splice` goes: the engine connects `address` (within
/// `timeout`) and, once connected, answers the CONNECT with `answer` (the response's HEADERS
/// frame, encoded by Python) before the flow's bytes.
#[derive(Debug)]
pub struct Destination {
    /// Made on Python's thread: a socket belongs to that thread's network namespace.
    pub socket: tokio::net::TcpSocket,
    pub address: SocketAddr,
    pub timeout: Duration,
    pub answer: Bytes,
}

/// Connect the flow's destination, answer the CONNECT and splice ([`run`]): the accepting
/// side's whole flow in one command, with no round trip through Python between the connect
/// and the splice. If the connect fails, nothing is sent on the stream: its receiving half is
/// stopped (H3_NO_ERROR) and `Event::SpliceUnconnected` says why, so Python refuses the
/// CONNECT (its sending half is still Python's). If Python aborts meanwhile, the stream is
/// reset both ways with its code (`Event::Spliced`, as an aborted splice).
#[allow(clippy::too_many_arguments)]
pub async fn connect_and_run(
    shared: Arc<Shared>,
    spec: SpliceSpec,
    held: Arc<Held>,
    destination: Destination,
    connection: Connection,
    recv: Option<oneshot::Receiver<RecvHandover>>,
    mut abort: oneshot::Receiver<u64>,
) {
    let Destination {
        socket,
        address,
        timeout,
        answer,
    } = destination;
    // The receiving half first: while the engine connects, the peer resetting the stream (it
    // gave the flow up) ends the connect at once, as on the Python path (`h3.py` `_on_reset`),
    // rather than holding the destination's slot and answering a stream nobody waits on.
    let mut given = match recv {
        Some(handover) => handover.await.ok(),
        None => None,
    };
    let connecting = tokio::time::timeout(timeout, socket.connect(address));
    let outcome = tokio::select! {
        connected = connecting => Ok(connected),
        code = &mut abort => Err(Failure::Aborted(code.unwrap_or(H3_REQUEST_CANCELLED))),
        code = peer_reset(&mut given) => Err(Failure::PeerReset(code)),
    };
    let (id, conn, stream) = (spec.id, spec.conn, spec.stream);
    // An abort that came with the connect's failure (in the same poll) is still an abort
    // (only then: a receiver that gave its value is not asked again).
    let outcome = match outcome {
        Ok(failed @ Ok(Err(_))) | Ok(failed @ Err(_)) => match abort.try_recv() {
            Ok(code) => Err(Failure::Aborted(code)),
            Err(_) => Ok(failed),
        },
        other => other,
    };
    let unconnected = match outcome {
        Ok(Ok(Ok(tcp))) => {
            // As asyncio's transports: no Nagle delay on the proxied flow.
            let _ = tcp.set_nodelay(true);
            let (send_to, send_from) = oneshot::channel();
            // The answer is queued first: the sending half goes to the splice with it.
            let send = (shared.command_send(conn, stream, SendCmd::Write(answer))
                && shared.command_send(conn, stream, SendCmd::Handover(send_to)))
            .then_some(send_from);
            let recv = given.map(|given| {
                let (recv_to, recv_from) = oneshot::channel();
                let _ = recv_to.send(given);
                recv_from
            });
            run(shared, spec, held, tcp, connection, send, recv, abort).await;
            return;
        }
        Ok(Ok(Err(error))) => Ok((
            error
                .raw_os_error()
                .unwrap_or(rustix::io::Errno::IO.raw_os_error()),
            error.to_string(),
        )),
        Ok(Err(_)) => Ok((
            rustix::io::Errno::TIMEDOUT.raw_os_error(),
            "timed out".to_owned(),
        )),
        Err(failure) => Err(failure),
    };
    let stop = match &unconnected {
        Ok(_) => H3_NO_ERROR,
        // The peer's reset is answered with a cancel (RFC 9114 section 4.1.1).
        Err(Failure::PeerReset(_)) => H3_REQUEST_CANCELLED,
        Err(failure) => failure.code(),
    };
    let stop = VarInt::from_u64(stop).unwrap_or(VarInt::from_u32(0x10c));
    if let Some(RecvHandover {
        recv: Some(mut recv),
        ..
    }) = given
    {
        let _ = recv.stop(stop);
    }
    lock(&shared.splices).remove(&id);
    match unconnected {
        Ok((errno, message)) => shared.push(Event::SpliceUnconnected {
            id,
            conn,
            stream,
            errno,
            message,
        }),
        Err(failure) => {
            shared.command_send(conn, stream, SendCmd::Reset(stop));
            shared.push(Event::Spliced {
                id,
                conn,
                stream,
                sent: 0,
                received: 0,
                error: failure.describe(stream, opened_here(&connection, stream)),
                code: failure.code(),
                connected: false,
            });
        }
    }
}

/// (splicing, while connecting) The code of the peer's reset of the stream's receiving half,
/// once it comes (already, if it came before the half was handed over); never without the
/// half, or once the half can no longer be reset (finished and read, stopped).
async fn peer_reset(given: &mut Option<RecvHandover>) -> u64 {
    match given {
        Some(RecvHandover {
            end: Some(RecvEnd::Reset(code)),
            ..
        }) => *code,
        Some(RecvHandover {
            recv: Some(recv), ..
        }) => match recv.received_reset().await {
            Ok(Some(code)) => code.into_inner(),
            _ => std::future::pending().await,
        },
        _ => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(frame_type: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_varint(frame_type, &mut out);
        encode_varint(payload.len() as u64, &mut out);
        out.extend_from_slice(payload);
        out
    }

    fn deframe_in_pieces(input: &[u8], piece: usize) -> Result<Vec<u8>, FrameError> {
        let mut deframer = Deframer::new();
        let mut out = Vec::new();
        for chunk in input.chunks(piece.max(1)) {
            deframer.feed(Bytes::copy_from_slice(chunk), &mut out)?;
        }
        deframer.finish()?;
        Ok(out.concat())
    }

    #[test]
    fn tcp_reads_become_data_frames_of_at_most_a_chunk() {
        let rt = crate::engine::runtime().unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let data: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i % 251) as u8).collect();
            let sent = data.clone();
            let writer = tokio::spawn(async move {
                write_tcp(&client, &sent, &Held::new(None)).await.unwrap();
            });
            let (mut frames, mut buffer, mut limit) = (Vec::new(), BytesMut::new(), FIRST_READ);
            while let Some((read, frame)) = read_data_frame(&server, &mut buffer, &mut limit)
                .await
                .unwrap()
            {
                // The first read takes at most FIRST_READ; a full one raises the limit.
                let most = if frames.is_empty() { FIRST_READ } else { CHUNK };
                assert!(read > 0 && read <= most, "read {read}");
                assert_eq!(frame.len(), data_header(read).len() + read);
                frames.extend_from_slice(&frame);
            }
            writer.await.unwrap();
            assert!(buffer.is_empty());
            assert_eq!(limit, CHUNK, "a full read raises the limit");
            assert_eq!(deframe_in_pieces(&frames, 1000).unwrap(), data);
        });
    }

    #[test]
    fn varints_round_trip_in_shortest_form() {
        for (value, length) in [
            (0u64, 1usize),
            (63, 1),
            (64, 2),
            (16383, 2),
            (16384, 4),
            ((1 << 30) - 1, 4),
            (1 << 30, 8),
            ((1 << 62) - 1, 8),
        ] {
            let mut out = Vec::new();
            encode_varint(value, &mut out);
            assert_eq!(out.len(), length, "{value}");
            assert_eq!(decode_varint(&out), Some((value, length)));
            assert_eq!(decode_varint(&out[..length - 1]), None);
        }
        // RFC 9000 A.1's examples.
        assert_eq!(
            decode_varint(&[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c]),
            Some((151_288_809_941_952_652, 8))
        );
        assert_eq!(decode_varint(&[0x7b, 0xbd]), Some((15_293, 2)));
    }

    #[test]
    fn data_frames_in_any_chunking_give_the_payload() {
        let mut input = frame(DATA, b"hello ");
        input.extend(frame(0x21, b"grease")); // reserved (0x1f * N + 0x21): skipped
        input.extend(frame(DATA, b""));
        input.extend(frame(DATA, &vec![7u8; 70_000]));
        input.extend(frame(0x2a, b""));
        input.extend(frame(DATA, b"world"));
        input.extend(frame(HEADERS, b"trailers")); // ends the body
        input.extend(frame(0x40, b"x"));
        let mut expected = b"hello ".to_vec();
        expected.extend(vec![7u8; 70_000]);
        expected.extend(b"world");
        for piece in [1, 2, 3, 7, 64, 1000, 100_000] {
            assert_eq!(
                deframe_in_pieces(&input, piece).unwrap(),
                expected,
                "{piece}"
            );
        }
    }

    #[test]
    fn frames_not_allowed_on_a_request_stream_are_frame_unexpected() {
        for frame_type in [0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0d] {
            let input = frame(frame_type, b"");
            let error = deframe_in_pieces(&input, 1).unwrap_err();
            assert_eq!(error.code, H3_FRAME_UNEXPECTED, "{frame_type:#x}");
        }
        let mut input = frame(HEADERS, b"t");
        input.extend(frame(DATA, b"late"));
        assert_eq!(
            deframe_in_pieces(&input, 5).unwrap_err().code,
            H3_FRAME_UNEXPECTED
        );
    }

    #[test]
    fn a_frame_cut_by_the_end_of_the_stream_is_a_frame_error() {
        let input = frame(DATA, b"abcdef");
        for cut in 1..input.len() {
            let error = deframe_in_pieces(&input[..cut], 2).unwrap_err();
            assert_eq!(error.code, H3_FRAME_ERROR, "{cut}");
        }
    }

    #[test]
    fn resuming_mid_frame_continues_it() {
        let mut deframer = Deframer::resume(Some(DATA), 3).unwrap();
        let mut out = Vec::new();
        let mut input = b"abc".to_vec();
        input.extend(frame(DATA, b"de"));
        deframer.feed(Bytes::from(input), &mut out).unwrap();
        assert_eq!(out.concat(), b"abcde");
        let mut skipping = Deframer::resume(Some(0x21), 2).unwrap();
        skipping
            .feed(Bytes::from_static(b"zz\x00\x01q"), &mut out)
            .unwrap();
        assert_eq!(out.concat(), b"abcdeq");
        assert!(Deframer::resume(Some(0x04), 1).is_err());
    }

    #[test]
    fn data_headers_parse_back() {
        for length in [0usize, 1, 63, 64, 16_383, 16_384, CHUNK] {
            let header = data_header(length);
            assert!(header.len() <= HEADER_ROOM);
            let (frame_type, used) = decode_varint(&header).unwrap();
            assert_eq!(frame_type, DATA);
            assert_eq!(decode_varint(&header[used..]).unwrap().0, length as u64);
        }
    }

    #[test]
    fn only_a_close_without_an_error_counts_as_graceful() {
        let application = |code: u32| {
            ConnectionError::ApplicationClosed(quinn::ApplicationClose {
                error_code: VarInt::from_u32(code),
                reason: Bytes::new(),
            })
        };
        let transport = |code: TransportErrorCode| {
            ConnectionError::ConnectionClosed(quinn::ConnectionClose {
                error_code: code,
                frame_type: None,
                reason: Bytes::new(),
            })
        };
        assert!(closed_gracefully(&application(0)));
        assert!(closed_gracefully(&application(0x100)));
        assert!(!closed_gracefully(&application(0x10c)));
        assert!(!closed_gracefully(&application(0x101)));
        assert!(closed_gracefully(&transport(TransportErrorCode::NO_ERROR)));
        assert!(!closed_gracefully(&transport(
            TransportErrorCode::PROTOCOL_VIOLATION
        )));
        assert!(!closed_gracefully(&ConnectionError::TimedOut));
        assert!(!closed_gracefully(&ConnectionError::LocallyClosed));
        assert!(!closed_gracefully(&ConnectionError::Reset));
    }

    #[test]
    fn a_socket_crosses_the_inbox_with_its_token() {
        use std::os::fd::AsFd;
        let inbox = FdInbox::get().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        inbox.send(42, listener.as_fd()).unwrap();
        let fd = inbox.take(42).unwrap();
        let again = std::net::TcpListener::from(fd);
        assert_eq!(again.local_addr().unwrap(), address);
        // One a failed call left (it never took it) is skipped, not taken as the next's.
        inbox.send(1, listener.as_fd()).unwrap();
        assert!(inbox.take(2).unwrap_err().contains("no socket"));
        inbox.send(3, listener.as_fd()).unwrap();
        inbox.send(4, listener.as_fd()).unwrap();
        let fd = inbox.take(4).unwrap();
        assert_eq!(
            std::net::TcpListener::from(fd).local_addr().unwrap(),
            address
        );
        assert!(inbox.take(5).unwrap_err().contains("no socket"));
    }

    #[test]
    fn the_idle_timer_runs_from_the_last_bytes_moved() {
        let rt = crate::engine::runtime().unwrap();
        rt.block_on(async {
            let limit = Duration::from_millis(400);
            let held = Held::new(Some(limit));
            let started = Instant::now();
            // Bytes move every 40 ms for 1.2 s: the timer never runs out meanwhile.
            let idle = held.idle();
            tokio::pin!(idle);
            while started.elapsed() < Duration::from_millis(1200) {
                tokio::select! {
                    _ = &mut idle => panic!("timed out while bytes moved"),
                    _ = tokio::time::sleep(Duration::from_millis(40)) => held.moved(),
                }
            }
            let quiet = Instant::now();
            match idle.await {
                Failure::Idle(after) => assert_eq!(after, limit),
                other => panic!("{other:?}"),
            }
            assert!(quiet.elapsed() >= limit - Duration::from_millis(60));
            // None: it never resolves.
            let never = Held::new(None);
            tokio::select! {
                _ = never.idle() => panic!("an idle timeout without a limit"),
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            }
        });
        assert_eq!(
            Failure::Idle(Duration::from_millis(700)).describe(4, true),
            "idle timeout: no bytes either way for 0.7s"
        );
        // The peer's H3_CONNECT_ERROR: its destination (a stream we opened), its client.
        assert_eq!(
            Failure::PeerReset(H3_CONNECT_ERROR).describe(0, true),
            "stream 0 destination TCP reset by peer (error code 0x10f)"
        );
        assert_eq!(
            Failure::PeerReset(H3_CONNECT_ERROR).describe(0, false),
            "stream 0 client TCP reset by peer (error code 0x10f)"
        );
    }

    #[test]
    fn a_slow_reader_taking_part_of_a_write_keeps_the_flow_alive() {
        let rt = crate::engine::runtime().unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let writer = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let (reader, _) = listener.accept().await.unwrap();
            // Small buffers both ways: the 4 MiB write goes out some KiB at a time.
            socket2::SockRef::from(&writer)
                .set_send_buffer_size(65536)
                .unwrap();
            socket2::SockRef::from(&reader)
                .set_recv_buffer_size(65536)
                .unwrap();
            let held = Held::new(Some(Duration::from_millis(400)));
            let data = vec![7u8; 4 << 20];
            let reading = async {
                let mut buffer = vec![0u8; 16384];
                let mut total = 0;
                while total < data.len() {
                    reader.readable().await.unwrap();
                    match reader.try_read(&mut buffer) {
                        Ok(read) => total += read,
                        Err(error) if error.kind() == ErrorKind::WouldBlock => continue,
                        Err(error) => panic!("{error}"),
                    }
                    // About 1.6 MB/s: the whole write takes about 2.6 s, past the timeout.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            let writing = async {
                tokio::select! {
                    written = write_tcp(&writer, &data, &held) => written.unwrap(),
                    failure = held.idle() => panic!("{failure:?} while the reader read"),
                }
            };
            tokio::join!(reading, writing);
        });
    }

    /// A connected pair on loopback: (ours, the peer's).
    fn tcp_pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (peer, _) = listener.accept().unwrap();
        (ours, peer)
    }

    /// Waits (a while at most) for `ours` to hear its peer's RST: its error, pending.
    fn wait_reset(ours: &std::net::TcpStream) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        for _ in 0..500 {
            // (No events asked for: only POLLERR, or POLLHUP, wakes it.)
            let mut fds = [PollFd::new(ours.as_fd(), PollFlags::empty())];
            poll(&mut fds, PollTimeout::from(10u16)).unwrap();
            if fds[0]
                .revents()
                .is_some_and(|events| events.contains(PollFlags::POLLERR))
            {
                return;
            }
        }
        panic!("no reset came");
    }

    #[test]
    fn a_peer_that_closed_in_order_and_reset_our_later_bytes_is_no_failure_at_our_fin() {
        use std::io::{Read, Write};
        let (mut ours, peer) = tcp_pair();
        drop(peer); // an orderly close: FIN
        assert_eq!(ours.read(&mut [0; 16]).unwrap(), 0);
        ours.write_all(b"later").unwrap(); // answered with RST
        wait_reset(&ours);
        shut_write(socket2::SockRef::from(&ours)).unwrap();
    }

    #[test]
    fn a_peer_that_reset_its_connection_is_a_failure_at_our_fin() {
        let (ours, peer) = tcp_pair();
        socket2::SockRef::from(&peer)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(peer); // RST, no FIN before it
        wait_reset(&ours);
        let error = shut_write(socket2::SockRef::from(&ours)).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::ConnectionReset, "{error}");
    }

    #[test]
    fn our_fin_to_a_peer_that_only_half_closed_goes_out() {
        use std::io::Read;
        let (ours, mut peer) = tcp_pair();
        peer.shutdown(Shutdown::Write).unwrap();
        shut_write(socket2::SockRef::from(&ours)).unwrap();
        assert_eq!(peer.read(&mut [0; 16]).unwrap(), 0);
    }
}

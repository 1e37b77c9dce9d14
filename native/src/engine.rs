//! The QUIC engine proper, free of Python: a quinn endpoint on a tokio runtime, whose
//! connections and streams are driven by tasks that report what happened as [`Event`]s.
//!
//! Python (see `lib.rs`) sends commands through per-stream channels and collects the events in
//! batches: [`Shared::push`] writes one byte to a socket pair when the queue becomes non-empty,
//! so an event loop can watch its other end.
//!
//! Stream credit is driven by the application's reads: a stream's receive task only takes data
//! out of quinn (which is what lets quinn send MAX_STREAM_DATA) when Python asked for a read.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::{Connection, ConnectionError, ReadError, RecvStream, SendStream, VarInt, WriteError};
use tokio::sync::mpsc::error::SendError;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::admission::{self, HalfOpenSlot};

/// The process-wide runtime driving every native endpoint: one tokio scheduler on one thread
/// of its own ("quicmesh-native"; the GIL is never needed there, and the machines quicmesh runs
/// on are small). Python's threads only hand it work (`enter` + `spawn`, commands on channels).
///
/// A current-thread scheduler, not a multi-thread one with one worker: that one runs a task
/// woken by the running task next (its LIFO slot), so every stream write woke quinn's
/// connection driver at once and each flow's bytes left in a datagram of their own. Here a
/// woken task joins the back of the queue: the flows made ready by one batch of packets all
/// write before the driver runs, and it coalesces them into full datagrams.
pub fn runtime() -> Result<&'static tokio::runtime::Runtime, String> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    static DRIVER: OnceLock<Result<(), String>> = OnceLock::new();
    let rt = RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the native QUIC runtime: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)?;
    DRIVER
        .get_or_init(|| {
            std::thread::Builder::new()
                .name("quicmesh-native".to_owned())
                .spawn(move || {
                    ON_ENGINE_THREAD.with(|on| on.set(true));
                    rt.block_on(std::future::pending::<()>())
                })
                .map(drop)
                .map_err(|e| format!("cannot start the native QUIC thread: {e}"))
        })
        .clone()?;
    Ok(rt)
}

thread_local! {
    /// Whether this thread is the engine's, the one that runs the runtime's tasks.
    static ON_ENGINE_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Write the wake-up byte Python's event loop watches for.
fn wake_reader(wake: &Mutex<Option<UnixStream>>) {
    // A full socket buffer means a wake-up byte is already pending: nothing is lost.
    if let Some(wake) = lock(wake).as_ref() {
        let _ = (&*wake).write(&[1]);
    }
}

/// Lock a mutex, also when a panicking task poisoned it (the data stays consistent: every
/// critical section here is a single map or queue operation).
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Why a connection ended or could not be established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseKind {
    /// This side's TLS refused the peer's certificate (a local rustls error).
    Verification,
    /// The peer refused our certificate: its TLS alert closed the connection.
    PeerRefused,
    /// The peer closed the connection (application or transport close without a TLS alert).
    PeerClosed,
    /// This side closed it.
    LocallyClosed,
    /// The idle timeout expired (the peer is unreachable or silent).
    TimedOut,
    /// The peer broke QUIC (quinn closed the connection with a transport error), or, after
    /// the handshake, HTTP/3 on a spliced stream ([`Shared::close_for_violation`]).
    Violation,
    /// Anything else: version mismatch, stateless reset.
    Failed,
}

impl CloseKind {
    pub fn name(self) -> &'static str {
        match self {
            CloseKind::Verification => "verification",
            CloseKind::PeerRefused => "peer_refused",
            CloseKind::PeerClosed => "peer_closed",
            CloseKind::LocallyClosed => "locally_closed",
            CloseKind::TimedOut => "timed_out",
            CloseKind::Violation => "violation",
            CloseKind::Failed => "failed",
        }
    }
}

/// Classify a quinn connection error; crypto errors (0x100-0x1ff) are certificate refusals:
/// ours when quinn reports a local `TransportError`, the peer's when its CONNECTION_CLOSE
/// carried the alert (`ConnectionClosed`, "aborted by peer").
pub fn classify(error: &ConnectionError) -> (CloseKind, String) {
    let is_crypto = |code: u64| (0x100..0x200).contains(&code);
    let kind = match error {
        ConnectionError::TransportError(e) if is_crypto(u64::from(e.code)) => {
            CloseKind::Verification
        }
        ConnectionError::ConnectionClosed(c) if is_crypto(u64::from(c.error_code)) => {
            CloseKind::PeerRefused
        }
        ConnectionError::ConnectionClosed(_) | ConnectionError::ApplicationClosed(_) => {
            CloseKind::PeerClosed
        }
        ConnectionError::LocallyClosed => CloseKind::LocallyClosed,
        ConnectionError::TimedOut => CloseKind::TimedOut,
        ConnectionError::TransportError(_) => CloseKind::Violation,
        _ => CloseKind::Failed,
    };
    let message = match error {
        ConnectionError::Reset => {
            "the peer sent a stateless reset: it no longer knows the connection \
             (restarted or dropped it)"
                .to_owned()
        }
        // quinn writes the code in decimal, bare ("closed by peer: 256"): as aioquic's.
        ConnectionError::ApplicationClosed(close) => {
            with_reason(u64::from(close.error_code), &close.reason)
        }
        _ => readable(error.to_string()),
    };
    (kind, message)
}

/// "closed by peer: error code 0x100, H3_NO_ERROR: a graceful close", with the peer's
/// reason phrase if it gave one (as the aioquic engine's `close_reason_text`).
fn with_reason(code: u64, reason: &[u8]) -> String {
    let reason = String::from_utf8_lossy(reason);
    let code = if code == crate::splice::H3_NO_ERROR {
        format!("error code {code:#x}, H3_NO_ERROR: a graceful close")
    } else {
        format!("error code {code:#x}")
    };
    if reason.is_empty() {
        format!("closed by peer: {code}")
    } else {
        format!("closed by peer: {reason} ({code})")
    }
}

/// rustls shows a verifier's own error in its Debug form,
/// `Other(OtherError(VerifyError("...")))`: the text inside, in its place.
pub fn readable(message: String) -> String {
    const OPEN: &str = "Other(OtherError(VerifyError(\"";
    const CLOSE: &str = "\")))";
    match (message.find(OPEN), message.rfind(CLOSE)) {
        (Some(start), Some(end)) if end > start => format!(
            "{}{}{}",
            &message[..start],
            message[start + OPEN.len()..end].replace("\\\"", "\""),
            &message[end + CLOSE.len()..]
        ),
        _ => message,
    }
}

/// What a server connection's path did (RFC 9000 section 9), as [`PathWatch`] saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathChange {
    /// The client's packets now come from `addr` (NAT rebinding or migration): quinn moved
    /// the connection there and sent a PATH_CHALLENGE.
    PeerAddressChanged,
    /// A PATH_RESPONSE came back while the connection was on the new path `addr`.
    Validated,
    /// The connection left the new path `addr` before any PATH_RESPONSE: quinn's
    /// validation timer (3 PTO) sent it back to the last validated path, or it moved on.
    Abandoned,
}

impl PathChange {
    pub fn name(self) -> &'static str {
        match self {
            PathChange::PeerAddressChanged => "peer_address_changed",
            PathChange::Validated => "path_validated",
            PathChange::Abandoned => "path_abandoned",
        }
    }
}

/// How often [`Shared::watch_paths`] samples a server connection's path.
pub const PATH_SAMPLE: Duration = Duration::from_millis(50);

/// quinn's concurrent bidirectional stream limit when `max_bidi_streams` is not set.
pub const QUINN_MAX_BIDI_STREAMS: u64 = 100;

/// How long after a stream of its peer ended a server connection's stream credit is
/// re-announced every [`PATH_SAMPLE`] ([`Shared::announce_credit`]), at least; four round
/// trips when longer (the slot is freed only once the peer acknowledged our end of it).
pub const CREDIT_WINDOW: Duration = Duration::from_millis(200);

/// (server) Tells path changes and their validation from samples of quinn's state.
///
/// quinn 0.11 validates a client's new path itself and raises no event: a packet from a new
/// address moves the connection there and challenges it (quinn-proto `migrate`); a matching
/// PATH_RESPONSE validates it; the validation timer sends it back to the previous path. What
/// it exposes is the remote address and the frame counters, so a sample is (remote address,
/// PATH_RESPONSE frames received): an address change is a migration, a PATH_RESPONSE counted
/// while on the new path its validation, a return to the old address before one its failure.
/// Sans-IO: the caller samples; a PATH_RESPONSE from the old path (quinn challenges it too)
/// is counted as well, so a validation is reported once any response arrived.
#[derive(Debug)]
pub struct PathWatch {
    remote: SocketAddr,
    responses: u64,
    /// The new path awaiting validation, and the one it replaced.
    pending: Option<(SocketAddr, SocketAddr)>,
}

impl PathWatch {
    pub fn new(remote: SocketAddr, responses: u64) -> Self {
        PathWatch {
            remote,
            responses,
            pending: None,
        }
    }

    /// Take a sample; returns what changed since the last one, in order.
    pub fn sample(&mut self, remote: SocketAddr, responses: u64) -> Vec<(PathChange, SocketAddr)> {
        let mut changes = Vec::new();
        let mut answered = responses > self.responses;
        self.responses = responses;
        if answered {
            if let Some((new, _)) = self.pending.take() {
                changes.push((PathChange::Validated, new));
                answered = false;
            }
        }
        if remote == self.remote {
            return changes;
        }
        let previous = std::mem::replace(&mut self.remote, remote);
        if let Some((new, old)) = self.pending.take() {
            changes.push((PathChange::Abandoned, new));
            if remote == old {
                return changes; // back on the last validated path
            }
        }
        changes.push((PathChange::PeerAddressChanged, remote));
        if answered {
            changes.push((PathChange::Validated, remote));
        } else {
            self.pending = Some((remote, previous));
        }
        changes
    }
}

/// (client) Wait until the server confirmed the handshake (HANDSHAKE_DONE, RFC 9001 4.1.2).
///
/// In TLS 1.3 a client's handshake completes before the server has checked the client's
/// certificate; a refusal comes after. Waiting for confirmation makes a refused client
/// certificate fail the connect instead of the first use. quinn has no event for it, so its
/// frame counters are polled every millisecond, at most until the connection ends.
pub async fn confirmed(conn: &Connection) -> Result<(), ConnectionError> {
    let confirmation = async {
        while conn.stats().frame_rx.handshake_done == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::select! {
        () = confirmation => Ok(()),
        error = conn.closed() => Err(error),
    }
}

/// The application error code a connection whose handshake took too long is closed with
/// (0: no error, as the aioquic listener's close).
const HANDSHAKE_TIMED_OUT: VarInt = VarInt::from_u32(0);

/// Whether quinn refused an Initial because its payload did not decrypt (a forged or
/// corrupted datagram: quinn-proto `Endpoint::accept`, "authentication failed").
pub fn undecryptable(error: &ConnectionError) -> bool {
    matches!(
        error,
        ConnectionError::TransportError(e)
            if e.code == quinn::TransportErrorCode::PROTOCOL_VIOLATION
                && e.reason == "authentication failed"
    )
}

/// A handshake under way on the server.
enum Pending {
    /// 0-RTT enabled, no ticket: served once the handshake completed.
    Early(Connection, quinn::ZeroRttAccepted),
    Full(quinn::Connecting),
}

/// What the engine reports to Python.
#[derive(Debug)]
pub enum Event {
    /// A client connection completed its handshake (peer verified), or, with `early`, resumed
    /// with 0-RTT: usable at once, the server's identity is the one its ticket recorded.
    Connected { token: u64, conn: u64, early: bool },
    /// A client connection failed before its handshake completed.
    ConnectFailed {
        token: u64,
        kind: CloseKind,
        message: String,
    },
    /// A server accepted a connection (client certificate verified), or, with `early`, a client
    /// resumed with a single-use ticket (its identity is the one the ticket recorded).
    Accepted { conn: u64, early: bool },
    /// (server) The handshake of a connection accepted early (0-RTT) completed, after
    /// `received` UDP payload bytes from the client (its 0-RTT data, Initial and Handshake
    /// packets): what the 0-RTT cap is checked against.
    HandshakeDone { conn: u64, received: u64 },
    /// A new connection's Initial was dropped, refused, answered with a Retry or timed out:
    /// `counter` names the admission counter it adds to.
    Admission {
        counter: &'static str,
        source: SocketAddr,
    },
    /// (client) The server accepted or rejected the 0-RTT data of an early connection
    /// (rejected: [`Shared::early`] says which streams were not lost).
    EarlyData { conn: u64, accepted: bool },
    /// A stream opened in 0-RTT was lost to the server's rejection of it.
    EarlyDataRejected { conn: u64, stream: u64 },
    /// An incoming connection from `source` failed its handshake (e.g. its certificate was
    /// refused).
    AcceptFailed {
        kind: CloseKind,
        message: String,
        source: SocketAddr,
    },
    /// A stream this side asked to open is open.
    StreamOpened { token: u64, conn: u64, stream: u64 },
    /// A stream could not be opened (the connection is gone).
    OpenFailed {
        token: u64,
        conn: u64,
        message: String,
    },
    /// The peer opened a stream.
    StreamAccepted {
        conn: u64,
        stream: u64,
        bidirectional: bool,
        /// Its first read is under way ([`Shared::set_first_read`]): a `Data` event follows
        /// without a read request.
        read_started: bool,
        /// That read took one of the connection's read permits
        /// ([`Shared::grant_read_permits`]).
        permit_used: bool,
    },
    /// Data read on a stream (in answer to a read request); `fin`: the peer finished it.
    Data {
        conn: u64,
        stream: u64,
        chunks: Vec<Bytes>,
        fin: bool,
    },
    /// What quinn held of a stream when Python asked (`RecvCmd::TakeReady`); a
    /// pending read request stays pending.
    Ready {
        conn: u64,
        stream: u64,
        chunks: Vec<Bytes>,
        fin: bool,
    },
    /// `bytes` more of a stream's writes were taken by quinn (within the peer's credit).
    Written { conn: u64, stream: u64, bytes: u64 },
    /// Every byte of a finished stream, and its FIN, were acknowledged by the peer: quinn
    /// holds nothing more for it (until then, closing the connection would lose its tail).
    SendAcked { conn: u64, stream: u64 },
    /// The peer reset the stream (RESET_STREAM) with `code`.
    ResetReceived { conn: u64, stream: u64, code: u64 },
    /// The peer asked us to stop sending (STOP_SENDING) with `code`.
    StopSendingReceived { conn: u64, stream: u64, code: u64 },
    /// (splicing) The stream's receive task stopped reading: every `Data` event it gave
    /// comes before this one.
    ReadPaused { conn: u64, stream: u64 },
    /// (splicing) A spliced flow ended: bytes carried each way (payload), and the failure
    /// that reset it (`error` empty and `code` 0 when both directions ended cleanly).
    Spliced {
        id: u64,
        conn: u64,
        stream: u64,
        sent: u64,
        received: u64,
        error: String,
        code: u64,
        /// False for a `connect_splice` given up before its destination connected.
        connected: bool,
    },
    /// (server) The client's path changed, or its validation ended (see [`PathWatch`]).
    Path {
        conn: u64,
        change: PathChange,
        addr: SocketAddr,
    },
    /// (client) An ICMP destination unreachable came back for the address a connection still
    /// in its handshake is connecting to (`errno`: `ECONNREFUSED` for a closed port, ...).
    ConnectUnreachable {
        token: u64,
        errno: i32,
        detail: String,
    },
    /// An ICMP destination unreachable came back for the connection's peer address. What it
    /// means (probe, or give up) is the liveness rule's to say, in Python.
    Unreachable {
        conn: u64,
        errno: i32,
        detail: String,
    },
    /// (splicing) The destination of a `connect_splice` could not be connected (`errno` and
    /// `message` as in `TcpConnected`): nothing was sent on the stream, its receiving half
    /// was stopped (H3_NO_ERROR), and its sending half is Python's again (to refuse it).
    SpliceUnconnected {
        id: u64,
        conn: u64,
        stream: u64,
        errno: i32,
        message: String,
    },
    /// (splicing) A TCP connect asked for with `tcp_connect` ended: `errno` 0 when the socket
    /// is connected (it waits in [`Shared::tcp`] for its splice), else why not (`ETIMEDOUT`
    /// when the timeout passed first).
    TcpConnected {
        token: u64,
        errno: i32,
        message: String,
    },
    /// (outbound flows) The acceptor accepted a connection from `peer`, parked as `flow`
    /// until Python starts it or takes it back (`outbound.rs`).
    FlowAccepted { flow: u64, peer: SocketAddr },
    /// (outbound flows) The acceptor rests: accepting failed for want of descriptors or
    /// memory (`message`); connections wait in the backlog meanwhile.
    AcceptPaused { message: String },
    /// (outbound flows) An engine flow's CONNECT on `stream` did not get the expected answer
    /// (`reason`): the stream was cancelled, the connection is parked again, untouched.
    /// `answer`: another answer's first frame, whole (else empty).
    FlowUnanswered {
        flow: u64,
        stream: u64,
        kind: crate::outbound::Unanswered,
        reason: String,
        answer: bytes::Bytes,
    },
    /// A connection ended; its streams are gone. `code` is the error code this side closed
    /// it with for a [`CloseKind::Violation`] (a QUIC transport error code, or an HTTP/3
    /// one), else 0.
    Closed {
        conn: u64,
        kind: CloseKind,
        message: String,
        code: u64,
    },
}

/// Commands for a stream's sending task.
#[derive(Debug)]
pub enum SendCmd {
    Write(Bytes),
    Finish,
    Reset(VarInt),
    /// (splicing) Hand the sending half, with the bytes not sent yet, to a splice.
    Handover(tokio::sync::oneshot::Sender<crate::splice::SendHandover>),
    /// (0-RTT rejected) Answer whether the stream is one quinn opened after it took the
    /// rejection (true), not one of the lost flight.
    Probe(tokio::sync::oneshot::Sender<bool>),
}

/// Commands for a stream's receiving task.
#[derive(Debug)]
pub enum RecvCmd {
    Read(usize),
    /// Give at once what quinn holds of the stream, up to this many bytes (a `Ready` event,
    /// maybe empty), without waiting for more and without changing the read asked for.
    TakeReady(usize),
    StopSending(VarInt),
    /// (splicing) Stop reading and say so with `Event::ReadPaused`.
    Pause,
    /// (splicing) Hand the receiving half to a splice, with what it gave Python.
    Handover(tokio::sync::oneshot::Sender<RecvHandover>),
    /// The connection ended: give (as `Data` events) what quinn received in order and still
    /// holds, then end; dropping the sender says it is done (see [`Shared::serve`]).
    Drain(tokio::sync::oneshot::Sender<()>),
}

/// What a stream's receiving task gave Python in `Data` events: how many bytes in all, and
/// the chunks since Python's last read request.
///
/// Python asks for the next chunk only once it has taken the last `Data` event in, so when
/// it hands a stream to a splice without pausing it first, the bytes it has not seen are at
/// most those of the events since its last request: their tail, by its count of what it saw
/// ([`ReadLog::unseen`]). That saves the `Pause`/`ReadPaused` round trip per spliced flow.
#[derive(Debug, Clone, Default)]
pub struct ReadLog {
    /// Bytes given in `Data` events in all.
    pub delivered: u64,
    /// The chunks given since the last read request.
    pub since_request: Vec<Bytes>,
}

impl ReadLog {
    fn requested(&mut self) {
        self.since_request.clear();
    }

    fn gave(&mut self, chunks: &[Bytes]) {
        for chunk in chunks {
            self.delivered += chunk.len() as u64;
            self.since_request.push(chunk.clone());
        }
    }

    /// The bytes Python had not seen when it had seen `received` bytes of the stream, in
    /// order; an error if that count does not fit what was given.
    pub fn unseen(&self, received: u64) -> Result<Vec<Bytes>, String> {
        let out_of_step = || {
            format!(
                "the stream's reader is out of step: Python saw {received} bytes, the engine \
                 gave {} ({} since the last read request)",
                self.delivered,
                self.since_request.iter().map(Bytes::len).sum::<usize>()
            )
        };
        let mut missing = self
            .delivered
            .checked_sub(received)
            .ok_or_else(out_of_step)?;
        let mut tail = Vec::new();
        for chunk in self.since_request.iter().rev() {
            if missing == 0 {
                break;
            }
            let length = chunk.len() as u64;
            if length <= missing {
                tail.push(chunk.clone());
                missing -= length;
            } else {
                tail.push(chunk.slice(chunk.len() - missing as usize..));
                missing = 0;
            }
        }
        if missing > 0 {
            return Err(out_of_step());
        }
        tail.reverse();
        Ok(tail)
    }
}

/// How a stream's receiving task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvEnd {
    /// It gave the FIN.
    Fin,
    /// The peer reset the stream with this code.
    Reset(u64),
    /// Stopped (STOP_SENDING), forgotten, or the connection failed.
    Stopped,
}

/// What a splice gets from a stream's receiving task: the half (None once the task has
/// ended), what the task gave Python, and how it ended if it did.
#[derive(Debug)]
pub struct RecvHandover {
    pub recv: Option<RecvStream>,
    pub log: ReadLog,
    pub end: Option<RecvEnd>,
}

/// The halves of a stream Python can still command.
#[derive(Debug, Default)]
pub struct StreamHandles {
    pub send: Option<UnboundedSender<SendCmd>>,
    pub recv: Option<UnboundedSender<RecvCmd>>,
    /// Which incarnation of the stream ID these are: after a rejected 0-RTT flight quinn
    /// gives the same IDs again, and the old tasks must not release the new halves.
    pub generation: u64,
    /// The tasks serving the halves: a later incarnation of the stream ID waits for them
    /// to end (see [`Shared::start_stream`]).
    pub tasks: [Option<tokio::task::JoinHandle<()>>; 2],
}

/// One incarnation of a stream: its connection, ID and generation.
#[derive(Debug, Clone, Copy)]
pub struct StreamKey {
    pub conn: u64,
    pub stream: u64,
    pub generation: u64,
}

/// (client) A connection resumed with 0-RTT, until Python took the outcome.
#[derive(Debug, Default)]
pub struct EarlyState {
    /// quinn took the server's rejection: streams opened from now on are 1-RTT ones.
    pub settled: bool,
    /// The streams opened after the rejection (not lost with the flight).
    pub kept: Vec<u64>,
}

/// A connect in its handshake: where to, and the task driving it.
pub type ConnectingEntry = (SocketAddr, Option<tokio::task::AbortHandle>);

/// A command from Python, run on the engine's thread.
type Command = Box<dyn FnOnce() + Send>;

/// Python's commands to the engine, run on the engine's thread in the order given, one
/// wake-up per batch ([`Shared::command`], [`Shared::flush`]).
///
/// A command sent from Python's thread straight into a stream's channel (or a task spawned
/// there) schedules the woken task from outside the runtime, and tokio's current-thread
/// scheduler then writes its wake-up eventfd every time: a new flow's six or seven commands
/// cost as many system calls, and as many wake-ups of the engine's thread when it sleeps
/// between them. Queued here instead, they wait for the `flush` Python's event loop makes
/// once per turn; one task takes the batch and runs it, so every send and spawn in it is a
/// local one.
#[derive(Default)]
pub struct Outbox {
    queue: Mutex<Vec<Command>>,
    /// Held while a batch runs: a batch taken later waits for the one before to end.
    running: Mutex<()>,
    ready: tokio::sync::Notify,
    /// Commands are queued (Python flushes them); else they run on the caller's thread.
    deferring: AtomicBool,
    /// The endpoint is gone: the task runs what is left and ends.
    closed: AtomicBool,
}

impl Outbox {
    /// Take the queued commands and run them in order.
    fn run_queued(&self) {
        let _running = lock(&self.running);
        let batch = std::mem::take(&mut *lock(&self.queue));
        for command in batch {
            // A command that panics is that command's failure only: the commands after it
            // (and the task that runs the endpoint's batches) carry on, as they did when
            // each ran in its own call from Python.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(command));
        }
    }
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("queued", &lock(&self.queue).len())
            .field("deferring", &self.deferring)
            .finish()
    }
}

/// (splicing) A TCP connection the engine makes for a splice (`tcp_connect`): the task still
/// connecting, or the connected socket waiting for its splice.
#[derive(Debug)]
pub enum TcpSlot {
    /// Its connect is a command not run yet ([`Shared::command`]).
    Starting,
    Connecting(tokio::task::AbortHandle),
    Connected(tokio::net::TcpStream),
}

/// State shared between the Python-facing endpoint and its tasks.
#[derive(Debug)]
pub struct Shared {
    events: Arc<Mutex<Vec<Event>>>,
    wake: Arc<Mutex<Option<UnixStream>>>,
    pub connections: Mutex<HashMap<u64, Connection>>,
    pub streams: Mutex<HashMap<(u64, u64), StreamHandles>>,
    /// Spliced flows by splice ID: where an abort from Python goes, and what each holds
    /// (`splice.rs`).
    pub splices: Mutex<HashMap<u64, crate::splice::SpliceHandle>>,
    /// (server) The path watch of each accepted connection ([`Shared::watch_paths`]).
    paths: Mutex<HashMap<u64, PathWatch>>,
    /// (server) When a stream the peer opened last ended, by connection
    /// ([`Shared::announce_credit`]).
    stream_ends: Mutex<HashMap<u64, Instant>>,
    /// (server) The peer's concurrent bidirectional stream limit (`max_bidi_streams`).
    max_bidi_streams: AtomicU64,
    /// (client) Connects in their handshake by token: the address and the task driving it
    /// (aborting the task drops quinn's `Connecting`, which closes the connection; none yet
    /// while the connect is being started).
    pub connecting: Mutex<HashMap<u64, ConnectingEntry>>,
    /// (splicing) The TCP connections made for splices by token, until a splice takes them.
    pub tcp: Mutex<HashMap<u64, TcpSlot>>,
    /// (client) Connections resumed with 0-RTT whose outcome Python has not taken yet
    /// ([`EarlyState`]); lock it before `streams`.
    pub early: Mutex<HashMap<u64, EarlyState>>,
    /// (splicing) Receiving halves handed over for a splice that Python starts next
    /// (`hand_over_read`, then `splice`), by (connection, stream).
    pub read_handovers: Mutex<HashMap<(u64, u64), tokio::sync::oneshot::Receiver<RecvHandover>>>,
    /// How much of a stream the peer opened is read at once, before Python asks (0: none).
    first_read: AtomicUsize,
    /// (server) Connections whose peer's new bidirectional streams are read at once only
    /// with a permit ([`Shared::grant_read_permits`]), and the permits left; a connection
    /// not named here has no such limit.
    read_permits: Mutex<HashMap<u64, usize>>,
    /// Python's commands, when they are deferred to a flush ([`Outbox`]).
    outbox: Arc<Outbox>,
    /// Connections this side closed because the peer broke HTTP/3 on a spliced stream:
    /// the code and reason, for the close's event ([`Shared::close_for_violation`]).
    violations: Mutex<HashMap<u64, (u64, String)>>,
    next_id: AtomicU64,
}

impl Shared {
    /// Create the shared state; returns it with the read end of the wake-up socket pair.
    pub fn new() -> std::io::Result<(Arc<Self>, UnixStream)> {
        let (reader, writer) = UnixStream::pair()?;
        reader.set_nonblocking(true)?;
        writer.set_nonblocking(true)?;
        let shared = Shared {
            events: Arc::default(),
            wake: Arc::new(Mutex::new(Some(writer))),
            connections: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            splices: Mutex::new(HashMap::new()),
            paths: Mutex::new(HashMap::new()),
            stream_ends: Mutex::new(HashMap::new()),
            max_bidi_streams: AtomicU64::new(QUINN_MAX_BIDI_STREAMS),
            connecting: Mutex::new(HashMap::new()),
            tcp: Mutex::new(HashMap::new()),
            early: Mutex::new(HashMap::new()),
            read_handovers: Mutex::new(HashMap::new()),
            first_read: AtomicUsize::new(0),
            read_permits: Mutex::new(HashMap::new()),
            outbox: Arc::default(),
            violations: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        };
        Ok((Arc::new(shared), reader))
    }

    /// Close the writing end of the wake-up socket pair (the endpoint is closed: Python no
    /// longer watches it); events are still queued for `drain`.
    pub fn close_wake(&self) {
        lock(&self.wake).take();
    }

    /// Give a command to a stream's sending task; false when that half is gone (finished,
    /// reset, stopped, or handed to a splice).
    pub fn command_send(&self, conn: u64, stream: u64, command: SendCmd) -> bool {
        let streams = lock(&self.streams);
        let sender = streams.get(&(conn, stream)).and_then(|h| h.send.as_ref());
        sender.is_some_and(|s| s.send(command).is_ok())
    }

    /// Read each stream the peer opens at once, up to `max` bytes, as if Python had asked:
    /// what Python's first read request of a new stream asks for, without the round trip to
    /// Python and back before the stream's first bytes (its request) reach Python.
    pub fn set_first_read(&self, max: Option<usize>) {
        self.first_read.store(max.unwrap_or(0), Ordering::Relaxed);
    }

    fn first_read(&self) -> Option<usize> {
        Some(self.first_read.load(Ordering::Relaxed)).filter(|max| *max > 0)
    }

    /// (server) Give `conn` `count` more permits to read a new bidirectional stream of the
    /// peer's at once; from the first call on, one without a permit is left unread until
    /// Python asks. Python's new-stream rate holds a stream beyond the rate in its slot by
    /// not reading it (quinn frees a stream's slot, and grants the peer a new one, once its
    /// reset has been read): a first read made regardless found the reset of a churner's
    /// stream when the engine came to it after the peer's RESET_STREAM (under load), and
    /// freed the slot before Python could hold it. A permit is a token Python took ahead.
    pub fn grant_read_permits(&self, conn: u64, count: usize) {
        if !lock(&self.connections).contains_key(&conn) {
            return; // gone (its entry would never be removed)
        }
        let mut permits = lock(&self.read_permits);
        let left = permits.entry(conn).or_insert(0);
        *left = left.saturating_add(count);
    }

    /// (server) Take back the read permits `conn` has left (its peer's rate was lowered:
    /// tokens taken ahead at the old rate would let that many streams by at once).
    pub fn revoke_read_permits(&self, conn: u64) -> usize {
        lock(&self.read_permits)
            .get_mut(&conn)
            .map_or(0, std::mem::take)
    }

    /// The first read of a new bidirectional stream the peer opened on `conn`, if any (the
    /// endpoint's, where the connection has no permits to count or one is left), and
    /// whether it took a permit.
    fn first_read_of_request(&self, conn: u64) -> (Option<usize>, bool) {
        let Some(first_read) = self.first_read() else {
            return (None, false);
        };
        match lock(&self.read_permits).get_mut(&conn) {
            None => (Some(first_read), false),
            Some(0) => (None, false),
            Some(left) => {
                *left -= 1;
                (Some(first_read), true)
            }
        }
    }

    /// From now on, queue Python's commands until its next [`Shared::flush`]; a task on the
    /// engine's thread runs each flushed batch in order.
    pub fn defer_commands(&self) -> Result<(), String> {
        if self.outbox.deferring.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let outbox = Arc::clone(&self.outbox);
        runtime()?.spawn(async move {
            loop {
                outbox.ready.notified().await;
                outbox.run_queued();
                if outbox.closed.load(Ordering::Acquire) {
                    break;
                }
            }
        });
        Ok(())
    }

    /// Run a command of Python's on the engine's thread after those given before it: queued
    /// until the next flush when commands are deferred, else run now on the caller's thread
    /// (within the runtime, so it may spawn tasks).
    pub fn command(&self, command: impl FnOnce() + Send + 'static) {
        if self.outbox.deferring.load(Ordering::Acquire) {
            lock(&self.outbox.queue).push(Box::new(command));
        } else if let Ok(rt) = runtime() {
            let _entered = rt.enter();
            command();
        }
    }

    /// Wake the engine's thread for the commands queued since the last flush (none: no
    /// wake-up).
    pub fn flush(&self) {
        if !lock(&self.outbox.queue).is_empty() {
            self.outbox.ready.notify_one();
        }
    }

    /// Run the queued commands now, on the caller's thread (before closing the endpoint:
    /// the closes and resets queued before go out first).
    pub fn run_commands_now(&self) {
        if let Ok(rt) = runtime() {
            let _entered = rt.enter();
            self.outbox.run_queued();
        }
    }

    /// The endpoint is gone: run the queued commands and end the task that runs them.
    pub fn close_outbox(&self) {
        self.outbox.closed.store(true, Ordering::Release);
        self.outbox.ready.notify_one();
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Queue an event; wake the reader if the queue was empty.
    ///
    /// On the engine's thread the wake-up is a task of its own, which the current-thread
    /// scheduler runs after the tasks already made ready (those woken by the same batch of
    /// datagrams or the same flush): their events join the queue first, and Python is woken
    /// once for them all. Woken at the first event, Python took each flow's end as it came,
    /// one wake-up of its thread (and two system calls on each side) per flow when eight
    /// flows ended together. Elsewhere (a test, Python's thread) the byte is written at once.
    pub fn push(&self, event: Event) {
        let mut events = lock(&self.events);
        let was_empty = events.is_empty();
        events.push(event);
        drop(events);
        if !was_empty {
            return;
        }
        if ON_ENGINE_THREAD.with(std::cell::Cell::get) {
            let (events, wake) = (Arc::clone(&self.events), Arc::clone(&self.wake));
            tokio::spawn(async move {
                // (Python may have taken them meanwhile, woken for earlier ones: then
                // waking it again would find nothing.)
                if !lock(&events).is_empty() {
                    wake_reader(&wake);
                }
            });
        } else {
            wake_reader(&self.wake);
        }
    }

    /// An ICMP destination unreachable came back for `error.destination` (from the socket's
    /// error queue, [`crate::icmp`]): tell every connection to that address, in its handshake
    /// or established.
    pub fn unreachable(&self, error: crate::icmp::Unreachable) {
        let destination = crate::icmp::canonical(error.destination);
        let tokens: Vec<u64> = lock(&self.connecting)
            .iter()
            .filter(|(_, (address, _))| crate::icmp::canonical(*address) == destination)
            .map(|(token, _)| *token)
            .collect();
        let connections: Vec<(u64, Connection)> = lock(&self.connections)
            .iter()
            .map(|(id, conn)| (*id, conn.clone()))
            .collect();
        for token in tokens {
            self.push(Event::ConnectUnreachable {
                token,
                errno: error.errno,
                detail: error.detail.clone(),
            });
        }
        for (conn, connection) in connections {
            if crate::icmp::canonical(connection.remote_address()) == destination {
                self.push(Event::Unreachable {
                    conn,
                    errno: error.errno,
                    detail: error.detail.clone(),
                });
            }
        }
    }

    /// Take every queued event.
    pub fn take_events(&self) -> Vec<Event> {
        std::mem::take(&mut *lock(&self.events))
    }

    /// Record a connection and start serving its incoming streams and its end.
    pub fn adopt(self: &Arc<Self>, conn: Connection) -> u64 {
        let id = self.next_id();
        lock(&self.connections).insert(id, conn.clone());
        let shared = Arc::clone(self);
        tokio::spawn(async move { shared.serve(id, conn).await });
        id
    }

    /// (server) Report the path changes of an accepted connection ([`PathWatch`]): sampled
    /// every [`PATH_SAMPLE`], and once more when it closes, before its `Closed` event.
    pub fn watch_paths(self: &Arc<Self>, id: u64, conn: Connection) {
        let watch = PathWatch::new(conn.remote_address(), conn.stats().frame_rx.path_response);
        lock(&self.paths).insert(id, watch);
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(PATH_SAMPLE);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = conn.closed() => break,
                    _ = ticks.tick() => {
                        shared.sample_paths(id, &conn);
                        shared.announce_credit(id, &conn);
                    }
                }
            }
            // `serve` takes the last sample and forgets the watch; if it was done before the
            // watch was made, the watch is forgotten here.
            if !lock(&shared.connections).contains_key(&id) {
                lock(&shared.paths).remove(&id);
            }
            lock(&shared.stream_ends).remove(&id);
        });
    }

    /// (server) The `max_bidi_streams` the endpoint's connections were configured with.
    pub fn set_max_bidi_streams(&self, limit: Option<u64>) {
        let limit = limit.unwrap_or(QUINN_MAX_BIDI_STREAMS);
        self.max_bidi_streams.store(limit, Ordering::Relaxed);
    }

    /// A stream ended on our side (both halves done, or its splice): on a server
    /// connection, one the client opened, its credit is re-announced for a while
    /// ([`Shared::announce_credit`]).
    /// Close connection `conn` because its peer broke HTTP/3 on a stream the engine carries
    /// (RFC 9114 8.1: a connection error, as the Python session makes it): the close's event
    /// says [`CloseKind::Violation`] with `code` and `message`, for Python's log line naming
    /// the peer. The first violation of a connection is the one reported.
    pub fn close_for_violation(
        &self,
        conn: u64,
        connection: &Connection,
        code: u64,
        message: &str,
    ) {
        {
            let mut violations = lock(&self.violations);
            if lock(&self.connections).contains_key(&conn) {
                violations
                    .entry(conn)
                    .or_insert_with(|| (code, message.to_owned()));
            }
        }
        let code = VarInt::from_u64(code).unwrap_or(VarInt::from_u32(0x101)); // H3_GENERAL_PROTOCOL_ERROR
        connection.close(code, message.as_bytes());
    }

    /// Fail a running splice or engine flow `id` (its `spliced` event follows); whether it
    /// was still running.
    pub fn abort_splice(&self, id: u64, code: u64) -> bool {
        match lock(&self.splices).remove(&id) {
            Some(handle) => handle.abort.send(code).is_ok(),
            None => false,
        }
    }

    /// The payload a running splice or engine flow `id` moved so far (`Held::moved_so_far`);
    /// None once it ended (its `spliced` event carries the totals).
    pub fn splice_moved(&self, id: u64) -> Option<(u64, u64)> {
        lock(&self.splices)
            .get(&id)
            .map(|handle| handle.held.moved_so_far())
    }

    pub fn stream_ended(&self, conn: u64, stream: u64) {
        let client_initiated = stream & 1 == 0;
        if client_initiated && lock(&self.paths).contains_key(&conn) {
            lock(&self.stream_ends).insert(conn, Instant::now());
        }
    }

    /// (server) Make quinn announce the stream slots freed since its last MAX_STREAMS.
    ///
    /// quinn-proto 0.11 announces new stream credit only once more than an eighth of the
    /// limit has been freed since its last announcement (`StreamsState::queue_max_stream_id`:
    /// `diff > max_concurrent / 8`), so a client holding all but a few of its streams open
    /// and waiting for one more waited for ever (docs/design.md). quinn re-checks that rule
    /// when the limit is set; with the limit at 0 an eighth is 0, so any freed slot is
    /// queued: set 0, then the real limit again (which allocates what 0 did not; the credit
    /// already granted stands, so the peer's streams are not affected). Done at every path
    /// sample for [`CREDIT_WINDOW`] after a client stream ended, since the slot is freed
    /// only when the client acknowledged our end of it, with no event for us.
    fn announce_credit(&self, id: u64, conn: &Connection) {
        let Some(ended) = lock(&self.stream_ends).get(&id).copied() else {
            return;
        };
        if ended.elapsed() > CREDIT_WINDOW.max(conn.rtt() * 4) {
            let mut ends = lock(&self.stream_ends);
            if ends.get(&id) == Some(&ended) {
                ends.remove(&id);
            }
            return;
        }
        let limit = self.max_bidi_streams.load(Ordering::Relaxed);
        let Ok(limit) = VarInt::from_u64(limit) else {
            return;
        };
        conn.set_max_concurrent_bi_streams(VarInt::from_u32(0));
        conn.set_max_concurrent_bi_streams(limit);
    }

    /// Sample a watched connection's path and report what changed (nothing for a client's).
    fn sample_paths(&self, id: u64, conn: &Connection) {
        let changes = match lock(&self.paths).get_mut(&id) {
            Some(watch) => watch.sample(conn.remote_address(), conn.stats().frame_rx.path_response),
            None => return,
        };
        for (change, addr) in changes {
            self.push(Event::Path {
                conn: id,
                change,
                addr,
            });
        }
    }

    /// (server) Complete an incoming connection admitted by [`crate::admission`] (quinn
    /// accepted its Initial: it decrypted), holding its half-open `slot` until the handshake
    /// completed, failed or took longer than `timeout` (then the connection is closed and
    /// counted).
    ///
    /// With 0-RTT enabled, a client that resumed with a ticket is served at once (its 0-RTT
    /// streams included): rustls restored the client certificate chain verified when the
    /// ticket was issued; [`Event::HandshakeDone`] follows when its handshake completes. A full
    /// handshake is served only once it completed, i.e. after the client's certificate was
    /// verified.
    pub async fn accept(
        self: Arc<Self>,
        connecting: quinn::Connecting,
        early_data: bool,
        slot: HalfOpenSlot,
        timeout: Duration,
    ) {
        let source = connecting.remote_address();
        let pending = if early_data {
            match connecting.into_0rtt() {
                Ok((conn, accepted)) if conn.peer_identity().is_some() => {
                    let id = self.adopt(conn.clone());
                    self.watch_paths(id, conn.clone());
                    self.push(Event::Accepted {
                        conn: id,
                        early: true,
                    });
                    let completed = tokio::select! {
                        _ = accepted => conn.close_reason().is_none(),
                        _ = conn.closed() => false,
                        () = tokio::time::sleep(timeout) => {
                            conn.close(HANDSHAKE_TIMED_OUT, b"handshake timed out");
                            admission::count(&self, "handshakes_timed_out", source);
                            false
                        }
                    };
                    if completed {
                        let received = conn.stats().udp_rx.bytes;
                        self.push(Event::HandshakeDone { conn: id, received });
                    }
                    drop(slot);
                    return;
                }
                Ok((conn, accepted)) => Pending::Early(conn, accepted),
                Err(connecting) => Pending::Full(connecting),
            }
        } else {
            Pending::Full(connecting)
        };
        let handshake = async move {
            match pending {
                Pending::Early(conn, accepted) => tokio::select! {
                    _ = accepted => match conn.close_reason() {
                        None => Ok(conn),
                        Some(error) => Err(error),
                    },
                    error = conn.closed() => Err(error),
                },
                Pending::Full(connecting) => connecting.await,
            }
        };
        // On timeout the handshake's future is dropped with the last handle of its
        // connection: quinn closes the connection then.
        let result = tokio::time::timeout(timeout, handshake).await;
        drop(slot);
        match result {
            Ok(Ok(conn)) => {
                let id = self.adopt(conn.clone());
                self.watch_paths(id, conn);
                self.push(Event::Accepted {
                    conn: id,
                    early: false,
                });
            }
            Ok(Err(error)) => {
                let (kind, message) = classify(&error);
                self.push(Event::AcceptFailed {
                    kind,
                    message,
                    source,
                });
            }
            Err(_) => admission::count(&self, "handshakes_timed_out", source),
        }
    }

    /// (client) Adopt a connection resumed with 0-RTT. No verifier runs in a resumed
    /// handshake: rustls resumes a session only under the verifier (the same allowed server
    /// identities) and client credentials that made it, so the server is the one verified
    /// when its ticket was issued; its chain is known once the server answered.
    pub fn adopt_early_client(
        self: &Arc<Self>,
        token: u64,
        conn: Connection,
        accepted: quinn::ZeroRttAccepted,
    ) {
        let id = self.adopt(conn);
        lock(&self.early).insert(id, EarlyState::default());
        self.push(Event::Connected {
            token,
            conn: id,
            early: true,
        });
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            let accepted = accepted.await;
            if accepted {
                lock(&shared.early).remove(&id);
            } else {
                shared.kept_after_rejection(id).await;
            }
            shared.push(Event::EarlyData { conn: id, accepted });
        });
    }

    /// (client, 0-RTT rejected) The connection's streams quinn opened after it took the
    /// rejection. quinn tells a 0-RTT stream only by its handle (`SendStream` keeps it to
    /// itself): each sending task is asked, and answers from its handle, whose `stopped()`
    /// fails at once with `ZeroRttRejected` for a stream of the lost flight now. A stream
    /// whose task ended is not kept (a lost one ends on `ZeroRttRejected`; Python resends
    /// every stream of the flight it knows, reset ones included).
    ///
    /// Recorded in [`Shared::early`] (marked settled first, under its lock: a stream
    /// `try_open_stream` opens from then on is recorded there as kept).
    async fn kept_after_rejection(&self, conn: u64) {
        let probes: Vec<_> = {
            let mut early = lock(&self.early);
            early.entry(conn).or_default().settled = true;
            lock(&self.streams)
                .iter()
                .filter(|((c, _), _)| *c == conn)
                .filter_map(|((_, stream), handles)| {
                    let (to, answer) = tokio::sync::oneshot::channel();
                    let send = handles.send.as_ref()?;
                    send.send(SendCmd::Probe(to))
                        .ok()
                        .map(|()| (*stream, answer))
                })
                .collect()
        };
        let mut kept = Vec::new();
        for (stream, answer) in probes {
            if answer.await == Ok(true) {
                kept.push(stream);
            }
        }
        if let Some(state) = lock(&self.early).get_mut(&conn) {
            state.kept.extend(kept);
        }
    }

    async fn serve(self: Arc<Self>, id: u64, conn: Connection) {
        loop {
            tokio::select! {
                accepted = conn.accept_bi() => match accepted {
                    Ok((send, recv)) => {
                        let stream = u64::from(send.id());
                        let (first_read, permit_used) = self.first_read_of_request(id);
                        self.start_stream(id, stream, Some(send), Some(recv), first_read, false);
                        self.push(Event::StreamAccepted {
                            conn: id,
                            stream,
                            bidirectional: true,
                            read_started: first_read.is_some(),
                            permit_used,
                        });
                    }
                    Err(_) => break,
                },
                accepted = conn.accept_uni() => match accepted {
                    Ok(recv) => {
                        // Read once Python asks (it does as it takes the event): a first
                        // read here let a peer's empty streams end at once, each giving
                        // back its credit, so a peer opened them without limit while
                        // Python was busy, every one an event held for it (8 MB/s).
                        let stream = u64::from(recv.id());
                        self.start_stream(id, stream, None, Some(recv), None, false);
                        self.push(Event::StreamAccepted {
                            conn: id,
                            stream,
                            bidirectional: false,
                            read_started: false,
                            permit_used: false,
                        });
                    }
                    Err(_) => break,
                },
            }
        }
        let closed = conn.closed().await;
        let (mut kind, mut message) = classify(&closed);
        let mut code = match &closed {
            ConnectionError::TransportError(error) if kind == CloseKind::Violation => {
                u64::from(error.code)
            }
            _ => 0,
        };
        self.sample_paths(id, &conn);
        lock(&self.paths).remove(&id);
        lock(&self.stream_ends).remove(&id);
        lock(&self.connections).remove(&id);
        // (Taken after the connection left `connections`: `close_for_violation` records
        // one only while it is there, so none is left behind.)
        if let Some((violation_code, violation)) = lock(&self.violations).remove(&id) {
            if kind == CloseKind::LocallyClosed {
                (kind, message, code) = (CloseKind::Violation, violation, violation_code);
            }
        }
        lock(&self.early).remove(&id);
        lock(&self.read_permits).remove(&id);
        // What the peer sent and quinn received in order is still readable after the close
        // (quinn hands out a closed connection's received stream data until none is left),
        // but the receive tasks read only on request: have each give what it holds before
        // the close is reported, as aioquic, which delivers data as it arrives, would have.
        let drained: Vec<_> = lock(&self.streams)
            .iter()
            .filter(|((c, _), _)| *c == id)
            .filter_map(|(_, handles)| {
                let (done, finished) = tokio::sync::oneshot::channel();
                let recv = handles.recv.as_ref()?;
                recv.send(RecvCmd::Drain(done)).ok().map(|()| finished)
            })
            .collect();
        for finished in drained {
            let _ = finished.await;
        }
        lock(&self.streams).retain(|(c, _), _| *c != id);
        // Receiving halves handed over for splices that never started (a caller that did
        // not abort its stream after a failed `splice`): the connection is gone.
        lock(&self.read_handovers).retain(|(c, _), _| *c != id);
        self.push(Event::Closed {
            conn: id,
            kind,
            message,
            code,
        });
    }

    /// Register a stream's halves and start their tasks.
    ///
    /// The stream ID may still have halves of an earlier incarnation: after a rejected 0-RTT
    /// flight quinn gives the flight's IDs again (its streams are gone, their handles fail
    /// with `ZeroRttRejected`). quinn keys the wake-ups of blocked readers and writers by
    /// stream ID, and dropping a `RecvStream` or `SendStream` removes the one registered
    /// under its ID: an old handle dropped after the new incarnation's task began to wait
    /// took that task's wake-up away, and the new stream's data never reached it (one
    /// request of a resent flight went unanswered). So the old tasks are told to end (their
    /// command channels close) and the new tasks touch quinn only once they have ended,
    /// their handles dropped (the tasks drop them before releasing their halves, so a
    /// forgotten incarnation holds none).
    ///
    /// From Python's thread (`from_python`) the tasks start as a command ([`Shared::command`]):
    /// the halves are registered at once (commands for them queue in their channels), and the
    /// command spawns their tasks unless a later incarnation took the ID meanwhile; then it
    /// drops the halves unused, before that incarnation's tasks start (its command comes later).
    pub fn start_stream(
        self: &Arc<Self>,
        conn: u64,
        stream: u64,
        send: Option<SendStream>,
        recv: Option<RecvStream>,
        first_read: Option<usize>,
        from_python: bool,
    ) {
        let generation = self.next_id();
        let mut handles = StreamHandles {
            generation,
            ..StreamHandles::default()
        };
        let id = StreamKey {
            conn,
            stream,
            generation,
        };
        let mut streams = lock(&self.streams);
        let [send_before, recv_before] = streams
            .remove(&(conn, stream))
            .map(|earlier| earlier.tasks) // its command senders are dropped here
            .unwrap_or_default();
        let send_task = send.map(|send| {
            let (tx, rx) = unbounded_channel();
            handles.send = Some(tx);
            Arc::clone(self).send_task(id, send, rx, send_before)
        });
        let recv_task = recv.map(|recv| {
            let (tx, rx) = unbounded_channel();
            handles.recv = Some(tx);
            Arc::clone(self).recv_task(id, recv, rx, recv_before, first_read)
        });
        if !from_python {
            handles.tasks = [send_task.map(tokio::spawn), recv_task.map(tokio::spawn)];
            streams.insert((conn, stream), handles);
            return;
        }
        streams.insert((conn, stream), handles);
        drop(streams);
        let shared = Arc::clone(self);
        self.command(move || {
            let mut streams = lock(&shared.streams);
            if let Some(handles) = streams
                .get_mut(&(conn, stream))
                .filter(|handles| handles.generation == generation)
            {
                handles.tasks = [send_task.map(tokio::spawn), recv_task.map(tokio::spawn)];
            }
        });
    }

    /// Forget a finished half (of this incarnation of the stream); the stream is forgotten
    /// when both are.
    fn release(&self, id: StreamKey, send_half: bool) {
        let forgotten = Self::release_in(&mut lock(&self.streams), id, send_half);
        if forgotten {
            self.stream_ended(id.conn, id.stream);
        }
    }

    /// [`Shared::release`] in the locked stream table; whether the stream is forgotten
    /// (the caller then calls `stream_ended`, once the lock is dropped).
    fn release_in(
        streams: &mut HashMap<(u64, u64), StreamHandles>,
        id: StreamKey,
        send_half: bool,
    ) -> bool {
        let key = (id.conn, id.stream);
        let Some(handles) = streams
            .get_mut(&key)
            .filter(|handles| handles.generation == id.generation)
        else {
            return false;
        };
        if send_half {
            handles.send = None;
        } else {
            handles.recv = None;
        }
        let forgotten = handles.send.is_none() && handles.recv.is_none();
        if forgotten {
            streams.remove(&key);
        }
        forgotten
    }

    /// Give a stream's receiving task `command` as one of Python's commands, in their
    /// order ([`Shared::command`]); false when that half is gone.
    ///
    /// Queued under the `streams` lock: a half that ends releases itself and queues the
    /// closing of its channel under the same lock ([`Shared::end_recv`]), so a command that
    /// found the half still reaches its channel before it closes, and is answered (a
    /// hand-over with what the half read, a pause with `ReadPaused`). Sent after the look,
    /// at the flush, it could find the channel closed and be lost: a splice's hand-over
    /// given as the stream's FIN arrived lost the bytes before it.
    pub fn command_recv_in_order(
        self: &Arc<Self>,
        conn: u64,
        stream: u64,
        command: RecvCmd,
    ) -> bool {
        let streams = lock(&self.streams);
        let Some(sender) = streams.get(&(conn, stream)).and_then(|h| h.recv.clone()) else {
            return false;
        };
        if !self.outbox.deferring.load(Ordering::Acquire) {
            return sender.send(command).is_ok();
        }
        let shared = Arc::clone(self);
        lock(&self.outbox.queue).push(Box::new(move || {
            // Only when the half handed itself over meanwhile (its channel then drops what
            // follows): a pause is answered here all the same.
            if let Err(SendError(RecvCmd::Pause)) = sender.send(command) {
                shared.push(Event::ReadPaused { conn, stream });
            }
        }));
        true
    }

    /// Serve a stream's sending half: `before`, the task of the ID's earlier incarnation,
    /// is waited for first (see [`Shared::start_stream`]).
    async fn send_task(
        self: Arc<Self>,
        id: StreamKey,
        mut send: SendStream,
        mut commands: UnboundedReceiver<SendCmd>,
        before: Option<tokio::task::JoinHandle<()>>,
    ) {
        if let Some(before) = before {
            let _ = before.await;
        }
        enum Step {
            Command(Option<SendCmd>),
            Wrote(Result<usize, WriteError>),
            Stopped(Result<Option<VarInt>, quinn::StoppedError>),
        }
        let StreamKey { conn, stream, .. } = id;
        let mut queue: VecDeque<Bytes> = VecDeque::new();
        let mut finishing = false;
        let mut finished = false;
        loop {
            let step = if let Some(front) = queue.front() {
                tokio::select! {
                    biased;
                    command = commands.recv() => Step::Command(command),
                    wrote = send.write(front) => Step::Wrote(wrote),
                }
            } else {
                let stopped = send.stopped();
                tokio::select! {
                    biased;
                    command = commands.recv() => Step::Command(command),
                    stopped = stopped => Step::Stopped(stopped),
                }
            };
            match step {
                Step::Command(None) => break,
                Step::Command(Some(SendCmd::Write(data))) => {
                    if !finishing && !data.is_empty() {
                        queue.push_back(data);
                    }
                }
                Step::Command(Some(SendCmd::Finish)) => finishing = true,
                Step::Command(Some(SendCmd::Reset(code))) => {
                    let _ = send.reset(code);
                    break;
                }
                Step::Command(Some(SendCmd::Probe(to))) => {
                    let mut stopped = pin!(send.stopped());
                    let lost = matches!(
                        stopped
                            .as_mut()
                            .poll(&mut Context::from_waker(Waker::noop())),
                        Poll::Ready(Err(quinn::StoppedError::ZeroRttRejected))
                    );
                    let _ = to.send(!lost);
                }
                Step::Command(Some(SendCmd::Handover(to))) => {
                    let _ = to.send((send, queue));
                    self.release(id, true);
                    return;
                }
                Step::Wrote(Ok(written)) => {
                    if let Some(front) = queue.front_mut() {
                        if written >= front.len() {
                            queue.pop_front();
                        } else {
                            let _ = front.split_to(written);
                        }
                    }
                    self.push(Event::Written {
                        conn,
                        stream,
                        bytes: written as u64,
                    });
                }
                Step::Wrote(Err(WriteError::ZeroRttRejected)) => {
                    self.push(Event::EarlyDataRejected { conn, stream });
                    break;
                }
                Step::Wrote(Err(WriteError::Stopped(code))) | Step::Stopped(Ok(Some(code))) => {
                    self.push(Event::StopSendingReceived {
                        conn,
                        stream,
                        code: code.into_inner(),
                    });
                    break;
                }
                Step::Stopped(Ok(None)) if finished => {
                    self.push(Event::SendAcked { conn, stream });
                    break;
                }
                // The connection is gone (its Closed event tells Python), or the stream was
                // already closed.
                Step::Wrote(Err(_)) | Step::Stopped(_) => break,
            }
            if finishing && !finished && queue.is_empty() {
                if send.finish().is_err() {
                    break;
                }
                finished = true;
            }
        }
        drop(send); // before the release: a forgotten half holds no quinn handle
        self.release(id, true);
    }

    /// Serve a stream's receiving half: `before`, the task of the ID's earlier incarnation,
    /// is waited for first (see [`Shared::start_stream`]).
    async fn recv_task(
        self: Arc<Self>,
        id: StreamKey,
        mut recv: RecvStream,
        mut commands: UnboundedReceiver<RecvCmd>,
        before: Option<tokio::task::JoinHandle<()>>,
        first_read: Option<usize>,
    ) {
        if let Some(before) = before {
            let _ = before.await;
        }
        enum Step {
            Command(Option<RecvCmd>),
            Read(Result<Option<quinn::Chunk>, ReadError>),
        }
        let StreamKey { conn, stream, .. } = id;
        let mut wanted: Option<usize> = first_read.map(|max| max.max(1));
        let mut paused = false;
        let mut log = ReadLog::default();
        let mut end = RecvEnd::Stopped;
        loop {
            let step = if let Some(max) = wanted {
                tokio::select! {
                    biased;
                    command = commands.recv() => Step::Command(command),
                    read = recv.read_chunk(max, true) => Step::Read(read),
                }
            } else {
                Step::Command(commands.recv().await)
            };
            match step {
                Step::Command(None) => break,
                Step::Command(Some(RecvCmd::Read(max))) => {
                    wanted = Some(max.max(1));
                    paused = false;
                    log.requested();
                }
                Step::Command(Some(RecvCmd::TakeReady(max))) => {
                    let (chunks, ready) = take_ready(&mut recv, Vec::new(), max);
                    if let Some(ended) = self.give(&mut log, id, chunks, ready, Batch::Ready) {
                        end = ended;
                        break;
                    }
                }
                Step::Command(Some(RecvCmd::StopSending(code))) => {
                    let _ = recv.stop(code);
                    break;
                }
                Step::Command(Some(RecvCmd::Pause)) => {
                    wanted = None;
                    paused = true;
                    self.push(Event::ReadPaused { conn, stream });
                }
                Step::Command(Some(RecvCmd::Handover(to))) => {
                    let _ = to.send(RecvHandover {
                        recv: Some(recv),
                        log,
                        end: None,
                    });
                    self.release(id, false);
                    return;
                }
                Step::Command(Some(RecvCmd::Drain(done))) => {
                    // A paused stream is being handed to a splice: its reader is gone.
                    if !paused {
                        end = self.drain_closed(&mut recv, conn, stream, &mut log).await;
                    }
                    drop(done);
                    break;
                }
                Step::Read(Ok(Some(chunk))) => {
                    let max = wanted.take().unwrap_or(chunk.bytes.len());
                    let (chunks, ready) = take_ready(&mut recv, vec![chunk.bytes], max);
                    if let Some(ended) = self.give(&mut log, id, chunks, ready, Batch::Read) {
                        end = ended;
                        break;
                    }
                }
                Step::Read(Ok(None)) => {
                    self.push(Event::Data {
                        conn,
                        stream,
                        chunks: Vec::new(),
                        fin: true,
                    });
                    end = RecvEnd::Fin;
                    break;
                }
                Step::Read(Err(ReadError::ZeroRttRejected)) => {
                    self.push(Event::EarlyDataRejected { conn, stream });
                    break;
                }
                Step::Read(Err(ReadError::Reset(code))) => {
                    self.push(Event::ResetReceived {
                        conn,
                        stream,
                        code: code.into_inner(),
                    });
                    end = RecvEnd::Reset(code.into_inner());
                    break;
                }
                Step::Read(Err(_)) => break,
            }
        }
        drop(recv); // before the release: a forgotten half holds no quinn handle
        self.end_recv(id, commands, log, end);
    }

    /// A stream's receiving task ended (FIN, reset, error): forget its half, then answer
    /// the commands that reached its channel after its last look. Python may have sent
    /// them while the task was ending (`recv_command` finds the half until the release):
    /// a `Pause` there must still get its `ReadPaused`, after the task's last `Data`, or
    /// the splice waiting for it never starts and its flow hangs; a `Handover` gets no half
    /// but what the task gave and how it ended (`log`, `end`): the splice adds what Python
    /// had not seen of it, and the FIN or the reset.
    fn end_recv(
        self: &Arc<Self>,
        id: StreamKey,
        commands: UnboundedReceiver<RecvCmd>,
        log: ReadLog,
        end: RecvEnd,
    ) {
        let mut streams = lock(&self.streams);
        // From here `recv_command` fails (and a pause is answered at once there).
        let forgotten = Self::release_in(&mut streams, id, false);
        let answer_now = if self.outbox.deferring.load(Ordering::Acquire) {
            // Python's commands for the half still wait in the outbox (queued under this
            // lock, `command_recv_in_order`): the channel closes behind them.
            let shared = Arc::clone(self);
            lock(&self.outbox.queue).push(Box::new(move || {
                shared.answer_ended(id, commands, &log, end);
            }));
            None
        } else {
            Some((commands, log))
        };
        drop(streams);
        if forgotten {
            self.stream_ended(id.conn, id.stream);
        }
        match answer_now {
            Some((commands, log)) => self.answer_ended(id, commands, &log, end),
            None => self.outbox.ready.notify_one(),
        }
    }

    /// Close an ended half's channel and answer the commands in it: what was sent before
    /// the close is there.
    fn answer_ended(
        &self,
        id: StreamKey,
        mut commands: UnboundedReceiver<RecvCmd>,
        log: &ReadLog,
        end: RecvEnd,
    ) {
        commands.close();
        while let Ok(command) = commands.try_recv() {
            match command {
                RecvCmd::Pause => self.push(Event::ReadPaused {
                    conn: id.conn,
                    stream: id.stream,
                }),
                RecvCmd::Handover(to) => {
                    let _ = to.send(RecvHandover {
                        recv: None,
                        log: log.clone(),
                        end: Some(end),
                    });
                }
                // Its data, FIN or reset went out before: nothing is left to take.
                RecvCmd::TakeReady(_) => self.push(Event::Ready {
                    conn: id.conn,
                    stream: id.stream,
                    chunks: Vec::new(),
                    fin: false,
                }),
                _ => {}
            }
        }
    }
}

/// The most bytes one `Data` event carries when a closed connection's streams are drained.
const DRAIN_BATCH: usize = 1 << 20;

impl Shared {
    /// (the connection is closed) Report what quinn still holds of the stream, in order:
    /// `Data` events, with the FIN if it was received, or the peer's reset after the data
    /// before it. The amount is what the peer was allowed to send and we had not read: at
    /// most the connection's receive window over all streams, so no reader can make it grow.
    async fn drain_closed(
        &self,
        recv: &mut RecvStream,
        conn: u64,
        stream: u64,
        log: &mut ReadLog,
    ) -> RecvEnd {
        let mut chunks = Vec::new();
        let mut total = 0;
        loop {
            // Never pending: once the connection is closed, a read that finds nothing
            // buffered fails (quinn's ConnectionLost) instead of waiting.
            let read = recv.read_chunk(DRAIN_BATCH, true).await;
            let (fin, reset) = match read {
                Ok(Some(chunk)) => {
                    total += chunk.bytes.len();
                    chunks.push(chunk.bytes);
                    if total < DRAIN_BATCH {
                        continue;
                    }
                    (false, None)
                }
                Ok(None) => (true, None),
                Err(ReadError::Reset(code)) => (false, Some(code.into_inner())),
                Err(_) => (false, None),
            };
            let last = fin || total < DRAIN_BATCH;
            if !chunks.is_empty() || fin {
                log.gave(&chunks);
                self.push(Event::Data {
                    conn,
                    stream,
                    chunks: std::mem::take(&mut chunks),
                    fin,
                });
            }
            total = 0;
            if let Some(code) = reset {
                self.push(Event::ResetReceived { conn, stream, code });
                return RecvEnd::Reset(code);
            }
            if last {
                return if fin { RecvEnd::Fin } else { RecvEnd::Stopped };
            }
        }
    }
}

/// What ended a [`take_ready`] besides the chunks it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadyEnd {
    /// Nothing more now (or `max` reached): the stream goes on.
    More,
    Fin,
    /// The peer's RESET_STREAM: quinn reports it once and then reads the stream as
    /// finished, so it must be told now (a later read would say FIN after a cut stream).
    Reset(u64),
}

/// Which of Python's requests a batch of a stream answers.
#[derive(Debug, Clone, Copy)]
enum Batch {
    /// A read request: a `Data` event.
    Read,
    /// A `TakeReady`: a `Ready` event.
    Ready,
}

impl Shared {
    /// Give Python a batch of a stream ([`take_ready`]'s), then the peer's reset if it
    /// came; the receiving task's end, if this is it.
    fn give(
        &self,
        log: &mut ReadLog,
        id: StreamKey,
        chunks: Vec<Bytes>,
        ready: ReadyEnd,
        batch: Batch,
    ) -> Option<RecvEnd> {
        let StreamKey { conn, stream, .. } = id;
        let fin = ready == ReadyEnd::Fin;
        log.gave(&chunks);
        self.push(match batch {
            Batch::Read => Event::Data {
                conn,
                stream,
                chunks,
                fin,
            },
            Batch::Ready => Event::Ready {
                conn,
                stream,
                chunks,
                fin,
            },
        });
        match ready {
            ReadyEnd::More => None,
            ReadyEnd::Fin => Some(RecvEnd::Fin),
            ReadyEnd::Reset(code) => {
                self.push(Event::ResetReceived { conn, stream, code });
                Some(RecvEnd::Reset(code))
            }
        }
    }
}

/// Add to `chunks` whatever quinn holds of the stream now, up to `max` bytes in all, so one
/// event carries a batch, and how it ended (never waits: read_chunk is cancel-safe, an
/// unfinished poll takes nothing).
fn take_ready(recv: &mut RecvStream, mut chunks: Vec<Bytes>, max: usize) -> (Vec<Bytes>, ReadyEnd) {
    let mut total: usize = chunks.iter().map(Bytes::len).sum();
    let mut context = Context::from_waker(Waker::noop());
    while total < max {
        let mut read = pin!(recv.read_chunk(max - total, true));
        match read.as_mut().poll(&mut context) {
            Poll::Ready(Ok(Some(chunk))) => {
                total += chunk.bytes.len();
                chunks.push(chunk.bytes);
            }
            Poll::Ready(Ok(None)) => return (chunks, ReadyEnd::Fin),
            Poll::Ready(Err(ReadError::Reset(code))) => {
                return (chunks, ReadyEnd::Reset(code.into_inner()))
            }
            // Pending, or an error the next read request will report (quinn keeps those).
            Poll::Ready(Err(_)) | Poll::Pending => break,
        }
    }
    (chunks, ReadyEnd::More)
}

/// The ack-eliciting frames among those counted (every kind but ACK, PADDING and
/// CONNECTION_CLOSE, RFC 9002 section 2): the liveness rules read "sent something the peer
/// must acknowledge" from its growth.
pub fn ack_eliciting(frames: &quinn::FrameStats) -> u64 {
    let f = frames;
    f.ack_frequency
        + f.crypto
        + f.data_blocked
        + f.datagram
        + u64::from(f.handshake_done)
        + f.immediate_ack
        + f.max_data
        + f.max_stream_data
        + f.max_streams_bidi
        + f.max_streams_uni
        + f.new_connection_id
        + f.new_token
        + f.path_challenge
        + f.path_response
        + f.ping
        + f.reset_stream
        + f.retire_connection_id
        + f.stream_data_blocked
        + f.streams_blocked_bidi
        + f.streams_blocked_uni
        + f.stop_sending
        + f.stream
}

/// The UDP buffer size asked for (the kernel caps it at net.core.rmem_max / wmem_max).
pub const UDP_BUFFER_BYTES: usize = 4 << 20;

/// Bind a UDP socket with large kernel buffers: the default (about 208 KiB) overflows under a
/// segmentation-offload burst, and every datagram dropped there is a loss to recovery.
pub fn bind_udp(address: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(address)?;
    let tuned = socket2::Socket::from(socket);
    // Best effort: a smaller buffer than asked for is not an error.
    let _ = tuned.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = tuned.set_send_buffer_size(UDP_BUFFER_BYTES);
    Ok(tuned.into())
}

/// Resolve `host:port` (numeric addresses only: quicmesh resolves names before connecting).
pub fn socket_addr(host: &str, port: u16) -> Result<SocketAddr, String> {
    let ip: std::net::IpAddr = host
        .parse()
        .map_err(|_| format!("'{host}' is not an IP address"))?;
    Ok(SocketAddr::new(ip, port))
}

/// Build quinn's transport parameters from the options Python passed.
#[derive(Debug, Clone, Default)]
pub struct TransportOptions {
    pub stream_receive_window: Option<u64>,
    pub receive_window: Option<u64>,
    pub send_window: Option<u64>,
    pub idle_timeout: Option<Duration>,
    pub keep_alive: Option<Duration>,
    pub max_bidi_streams: Option<u64>,
    pub max_uni_streams: Option<u64>,
    pub congestion: Option<String>,
    /// The UDP payload size sent from the start (quinn's `initial_mtu`; QUIC's 1200 minimum
    /// stays the floor black-hole detection falls back to).
    pub initial_mtu: Option<u16>,
    /// Path MTU discovery (DPLPMTUD, RFC 8899 / RFC 9000 14.3) up to this UDP payload size;
    /// `Some(0)`: off (the size stays `initial_mtu`). Default: quinn's, up to 1452.
    pub mtu_discovery_max: Option<u16>,
    /// Ask a peer that supports draft-ietf-quic-ack-frequency to send an ACK only after this
    /// many ack-eliciting packets (or its max_ack_delay); `None`: quinn's default, no
    /// ACK_FREQUENCY frames (the peer acknowledges every second packet).
    pub ack_eliciting_threshold: Option<u64>,
    /// Write a qlog file (JSON-SEQ, quinn-proto's `qlog` feature) per connection here.
    pub qlog_dir: Option<std::path::PathBuf>,
}

impl TransportOptions {
    pub fn build(&self) -> Result<quinn::TransportConfig, String> {
        let varint = |name: &str, value: u64| {
            VarInt::from_u64(value).map_err(|_| format!("{name} {value} is too large"))
        };
        let mut config = quinn::TransportConfig::default();
        if let Some(v) = self.stream_receive_window {
            config.stream_receive_window(varint("stream_receive_window", v)?);
        }
        if let Some(v) = self.receive_window {
            config.receive_window(varint("receive_window", v)?);
        }
        if let Some(v) = self.send_window {
            config.send_window(v);
        }
        if let Some(v) = self.idle_timeout {
            let timeout = quinn::IdleTimeout::try_from(v)
                .map_err(|_| format!("idle_timeout {v:?} is too large"))?;
            config.max_idle_timeout(Some(timeout));
        }
        config.keep_alive_interval(self.keep_alive);
        if let Some(v) = self.max_bidi_streams {
            config.max_concurrent_bidi_streams(varint("max_bidi_streams", v)?);
        }
        if let Some(v) = self.max_uni_streams {
            config.max_concurrent_uni_streams(varint("max_uni_streams", v)?);
        }
        if let Some(mtu) = self.initial_mtu {
            if !(1200..=65527).contains(&mtu) {
                return Err(format!("initial_mtu {mtu} is not within 1200 to 65527"));
            }
            config.initial_mtu(mtu);
        }
        match self.mtu_discovery_max {
            None => {}
            Some(0) => {
                config.mtu_discovery_config(None);
            }
            Some(max) => {
                let mut discovery = quinn::MtuDiscoveryConfig::default();
                discovery.upper_bound(max.max(self.initial_mtu.unwrap_or(1200)));
                config.mtu_discovery_config(Some(discovery));
            }
        }
        if let Some(threshold) = self.ack_eliciting_threshold {
            let mut frequency = quinn::AckFrequencyConfig::default();
            frequency.ack_eliciting_threshold(varint("ack_eliciting_threshold", threshold)?);
            config.ack_frequency_config(Some(frequency));
        }
        match self.congestion.as_deref() {
            None | Some("cubic") => {}
            Some("newreno") => {
                config.congestion_controller_factory(Arc::new(
                    quinn::congestion::NewRenoConfig::default(),
                ));
            }
            Some("bbr") => {
                config
                    .congestion_controller_factory(Arc::new(crate::bbr::ModelBbrConfig::default()));
            }
            Some(other) => {
                return Err(format!(
                    "congestion control '{other}' is not one of cubic, newreno, bbr"
                ))
            }
        }
        Ok(config)
    }

    /// [`Self::build`] for one connection: with `qlog_dir`, its own qlog stream (quinn
    /// writes a connection's events to the stream of the transport config it was made
    /// with), in a new file named after `side` and `id`.
    pub fn build_for_connection(
        &self,
        side: &str,
        id: u64,
    ) -> Result<Arc<quinn::TransportConfig>, String> {
        let mut config = self.build()?;
        if let Some(dir) = &self.qlog_dir {
            let path = dir.join(format!("native-{side}-{}-{id}.sqlog", std::process::id()));
            let file = std::fs::File::create(&path)
                .map_err(|e| format!("cannot create qlog file {}: {e}", path.display()))?;
            let mut qlog = quinn::QlogConfig::default();
            qlog.writer(Box::new(file))
                .title(Some(format!("quicmesh native {side} connection {id}")));
            config.qlog_stream(qlog.into_stream());
        }
        Ok(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verifier_error_reads_as_its_text() {
        let shown = "the cryptographic handshake failed: error 42: invalid peer certificate: \
                     Other(OtherError(VerifyError(\"peer identity spiffe://m/x is not \\\"allowed\\\"\")))";
        assert_eq!(
            readable(shown.to_owned()),
            "the cryptographic handshake failed: error 42: invalid peer certificate: \
             peer identity spiffe://m/x is not \"allowed\""
        );
        assert_eq!(readable("timed out".to_owned()), "timed out");
    }

    #[test]
    fn deferred_commands_wait_for_the_flush_then_run_in_order_on_the_engine_thread() {
        /// Each command's number and the thread it ran on.
        type Ran = Arc<Mutex<Vec<(u32, Option<String>)>>>;
        let (shared, _reader) = Shared::new().unwrap();
        let ran: Ran = Arc::default();
        let record = |n: u32| {
            let ran = Arc::clone(&ran);
            move || {
                let thread = std::thread::current().name().map(str::to_owned);
                lock(&ran).push((n, thread));
            }
        };
        // Not deferring: a command runs at once, on the caller's thread.
        shared.command(record(0));
        assert_eq!(lock(&ran).len(), 1);
        shared.defer_commands().unwrap();
        let (done_to, done) = std::sync::mpsc::channel();
        for n in 1..=50 {
            shared.command(record(n));
        }
        shared.command(move || done_to.send(()).unwrap());
        // Held until the flush: nothing of the batch ran.
        assert!(done.recv_timeout(Duration::from_millis(100)).is_err());
        assert_eq!(lock(&ran).len(), 1);
        shared.flush();
        done.recv_timeout(Duration::from_secs(10)).unwrap();
        let ran = lock(&ran);
        let order: Vec<u32> = ran.iter().map(|(n, _)| *n).collect();
        assert_eq!(order, (0..=50).collect::<Vec<_>>());
        assert!(ran[1..]
            .iter()
            .all(|(_, thread)| thread.as_deref() == Some("quicmesh-native")));
        shared.close_outbox();
    }

    #[test]
    fn path_changes_are_told_from_samples() {
        let a: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2000".parse().unwrap();
        let c: SocketAddr = "127.0.0.1:3000".parse().unwrap();
        let mut watch = PathWatch::new(a, 0);
        assert!(watch.sample(a, 0).is_empty());
        // Moved to b, answered later: one change, one validation.
        assert_eq!(watch.sample(b, 0), [(PathChange::PeerAddressChanged, b)]);
        assert_eq!(watch.sample(b, 1), [(PathChange::Validated, b)]);
        assert!(watch.sample(b, 1).is_empty());
        // Moved and answered between two samples.
        assert_eq!(
            watch.sample(c, 2),
            [
                (PathChange::PeerAddressChanged, c),
                (PathChange::Validated, c)
            ]
        );
        // Moved to a, never answered: quinn went back to c.
        assert_eq!(watch.sample(a, 2), [(PathChange::PeerAddressChanged, a)]);
        assert_eq!(watch.sample(c, 2), [(PathChange::Abandoned, a)]);
        assert!(watch.sample(c, 2).is_empty());
        // Moved to a, then on to b before an answer; b is answered.
        watch.sample(a, 2);
        assert_eq!(
            watch.sample(b, 2),
            [
                (PathChange::Abandoned, a),
                (PathChange::PeerAddressChanged, b)
            ]
        );
        assert_eq!(watch.sample(b, 3), [(PathChange::Validated, b)]);
    }

    #[test]
    fn a_refusal_says_whose_tls_refused() {
        let bad_certificate = quinn::TransportErrorCode::crypto(42);
        let ours = ConnectionError::TransportError(quinn_proto::TransportError {
            code: bad_certificate,
            frame: None,
            reason: "invalid peer certificate".into(),
        });
        assert_eq!(classify(&ours).0, CloseKind::Verification);
        let theirs = ConnectionError::ConnectionClosed(quinn_proto::ConnectionClose {
            error_code: bad_certificate,
            frame_type: None,
            reason: bytes::Bytes::from_static(b"invalid peer certificate"),
        });
        let (kind, message) = classify(&theirs);
        assert_eq!(kind, CloseKind::PeerRefused);
        assert!(message.starts_with("aborted by peer"), "{message}");
        let closed = ConnectionError::ConnectionClosed(quinn_proto::ConnectionClose {
            error_code: quinn::TransportErrorCode::NO_ERROR,
            frame_type: None,
            reason: bytes::Bytes::new(),
        });
        assert_eq!(classify(&closed).0, CloseKind::PeerClosed);
    }

    #[test]
    fn an_application_close_gives_its_code_in_hex_as_aioquic_does() {
        let close = |reason: &'static [u8]| {
            ConnectionError::ApplicationClosed(quinn_proto::ApplicationClose {
                error_code: VarInt::from_u32(0x100),
                reason: bytes::Bytes::from_static(reason),
            })
        };
        assert_eq!(
            classify(&close(b"")).1,
            "closed by peer: error code 0x100, H3_NO_ERROR: a graceful close"
        );
        assert_eq!(
            classify(&close(b"draining")).1,
            "closed by peer: draining (error code 0x100, H3_NO_ERROR: a graceful close)"
        );
    }

    #[test]
    fn options_reject_bad_values() {
        let bad = TransportOptions {
            congestion: Some("vegas".into()),
            ..Default::default()
        };
        assert!(bad.build().unwrap_err().contains("vegas"));
        let huge = TransportOptions {
            stream_receive_window: Some(u64::MAX),
            ..Default::default()
        };
        assert!(huge.build().unwrap_err().contains("too large"));
        let good = TransportOptions {
            congestion: Some("bbr".into()),
            ..Default::default()
        };
        assert!(good.build().is_ok());
        let small = TransportOptions {
            initial_mtu: Some(1000),
            ..Default::default()
        };
        assert!(small.build().unwrap_err().contains("initial_mtu 1000"));
        let tuned = TransportOptions {
            initial_mtu: Some(1452),
            mtu_discovery_max: Some(0),
            ack_eliciting_threshold: Some(9),
            ..Default::default()
        };
        assert!(tuned.build().is_ok());
        let huge_threshold = TransportOptions {
            ack_eliciting_threshold: Some(u64::MAX),
            ..Default::default()
        };
        assert!(huge_threshold.build().unwrap_err().contains("too large"));
    }

    #[test]
    fn qlog_files_are_made_per_connection() {
        let dir = std::env::temp_dir().join(format!("quicmesh-qlog-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let options = TransportOptions {
            qlog_dir: Some(dir.clone()),
            ..Default::default()
        };
        options.build_for_connection("client", 7).unwrap();
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(names[0].starts_with("native-client-") && names[0].ends_with("-7.sqlog"));
        let missing = TransportOptions {
            qlog_dir: Some(dir.join("missing")),
            ..Default::default()
        };
        assert!(missing
            .build_for_connection("server", 1)
            .unwrap_err()
            .contains("cannot create qlog file"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn udp_buffers_are_raised() {
        let socket = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let size = socket2::SockRef::from(&socket).recv_buffer_size().unwrap();
        assert!(size > 212_992, "{size}");
    }

    #[test]
    fn addresses_are_numeric() {
        assert!(socket_addr("127.0.0.1", 4433).is_ok());
        assert!(socket_addr("::1", 4433).is_ok());
        assert!(socket_addr("localhost", 4433).is_err());
    }

    /// The splice hang: Python's `pause_read` found the stream's receiving half and queued
    /// a `Pause` just as its task, having read the FIN, was ending. The task must still
    /// answer it (after its last `Data`), or the flow's splice waits for ever.
    /// Stream 4 of connection 7: its key and the command channel of its receiving task.
    fn recv_task_channel() -> (
        StreamKey,
        tokio::sync::mpsc::UnboundedSender<RecvCmd>,
        UnboundedReceiver<RecvCmd>,
    ) {
        let (tx, rx) = unbounded_channel();
        let key = StreamKey {
            conn: 7,
            stream: 4,
            generation: 1,
        };
        (key, tx, rx)
    }

    #[test]
    fn a_pause_reaching_an_ending_recv_task_is_answered() {
        let (shared, _reader) = Shared::new().unwrap();
        let (key, tx, rx) = recv_task_channel();
        lock(&shared.streams).insert(
            (7, 4),
            StreamHandles {
                send: None,
                recv: Some(tx),
                generation: 1,
                tasks: [None, None],
            },
        );
        // The task's last event, then Python's pause (as `recv_command` sends it).
        shared.push(Event::Data {
            conn: 7,
            stream: 4,
            chunks: vec![Bytes::from_static(b"last")],
            fin: true,
        });
        let sent = lock(&shared.streams)
            .get(&(7, 4))
            .and_then(|handles| handles.recv.as_ref())
            .map(|recv| recv.send(RecvCmd::Pause).is_ok());
        assert_eq!(sent, Some(true));
        shared.end_recv(key, rx, ReadLog::default(), RecvEnd::Fin);
        let events = shared.take_events();
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(matches!(events[0], Event::Data { fin: true, .. }));
        assert!(matches!(
            events[1],
            Event::ReadPaused { conn: 7, stream: 4 }
        ));
        // The half is forgotten: a later pause is answered by `pause_read` itself.
        assert!(lock(&shared.streams).get(&(7, 4)).is_none());
    }

    /// A stream handed to a splice without a pause: the splice gets what the last `Data`
    /// events gave that Python had not taken in, by Python's count of what it saw.
    #[test]
    fn a_handover_gives_the_splice_what_python_had_not_seen() {
        let mut log = ReadLog::default();
        log.gave(&[Bytes::from_static(b"headers")]);
        log.requested();
        log.gave(&[Bytes::from_static(b"abc"), Bytes::from_static(b"defg")]);
        assert_eq!(log.delivered, 14);
        // Python saw every event: nothing to add.
        assert!(log.unseen(14).unwrap().is_empty());
        // The last event was still on its way to Python.
        assert_eq!(log.unseen(7).unwrap().concat(), b"abcdefg");
        // Only part of it (events are whole; the count may still fall inside a chunk).
        assert_eq!(log.unseen(9).unwrap().concat(), b"cdefg");
        // Python saw more than was given, or missed more than the events since its last
        // read request: out of step, the flow fails rather than lose or repeat bytes.
        assert!(log.unseen(15).unwrap_err().contains("out of step"));
        assert!(log.unseen(6).unwrap_err().contains("out of step"));
    }

    /// A handover that reaches a receiving task as it ends (it gave the FIN) is answered
    /// with what it gave and the FIN, not dropped: Python may not have seen that `Data`.
    #[test]
    fn a_handover_reaching_an_ending_recv_task_gets_its_last_data_and_end() {
        let (shared, _reader) = Shared::new().unwrap();
        let (key, tx, rx) = recv_task_channel();
        let (to, mut from) = tokio::sync::oneshot::channel();
        tx.send(RecvCmd::Handover(to)).unwrap();
        let mut log = ReadLog::default();
        log.gave(&[Bytes::from_static(b"last")]);
        shared.end_recv(key, rx, log, RecvEnd::Fin);
        let handover = from.try_recv().unwrap();
        assert!(handover.recv.is_none());
        assert_eq!(handover.end, Some(RecvEnd::Fin));
        assert_eq!(handover.log.unseen(0).unwrap().concat(), b"last");
    }

    #[test]
    fn push_wakes_once_per_batch() {
        let (shared, mut reader) = Shared::new().unwrap();
        shared.push(Event::Accepted {
            conn: 1,
            early: false,
        });
        shared.push(Event::Accepted {
            conn: 2,
            early: false,
        });
        let mut buf = [0u8; 8];
        let n = std::io::Read::read(&mut reader, &mut buf).unwrap();
        assert_eq!(n, 1);
        assert_eq!(shared.take_events().len(), 2);
        assert!(shared.take_events().is_empty());
    }

    #[test]
    fn an_unreachable_destination_reaches_the_connects_to_it_only() {
        let (shared, _reader) = Shared::new().unwrap();
        let dead: SocketAddr = "10.0.0.2:443".parse().unwrap();
        let other: SocketAddr = "10.0.0.3:443".parse().unwrap();
        lock(&shared.connecting).insert(7, (dead, None));
        lock(&shared.connecting).insert(8, (other, None));
        lock(&shared.connecting).insert(9, (dead, None));
        shared.unreachable(crate::icmp::Unreachable {
            // As an IPv6 dual-stack socket names it.
            destination: "[::ffff:10.0.0.2]:443".parse().unwrap(),
            errno: 111,
            detail: "ICMP type 3 code 3".to_owned(),
        });
        let mut tokens: Vec<u64> = shared
            .take_events()
            .into_iter()
            .map(|event| match event {
                Event::ConnectUnreachable { token, errno, .. } => {
                    assert_eq!(errno, 111);
                    token
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        tokens.sort_unstable();
        assert_eq!(tokens, [7, 9]);
    }
}

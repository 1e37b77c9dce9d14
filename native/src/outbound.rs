//! Outbound flows the engine runs from accept to end (the sidecar's outbound listener).
//!
//! A [`FlowAcceptor`] accepts the application's TCP connections on a listening socket Python
//! bound, on the engine's thread, and tells Python of each in its batch of events
//! (`flow_accepted`). Python then either starts the flow as an *engine flow*
//! (`Endpoint.start_flow`: on a connection it chose, with the CONNECT's HEADERS frame it
//! encoded and the answer it expects) or takes the socket back (`release`) and carries the
//! flow itself. An engine flow is run here without Python: open the stream, send the
//! CONNECT, read the answer and, when it is byte for byte the 200 Python gave, splice the
//! socket onto the stream ([`crate::splice::carry`]); Python hears of it again at its end
//! (`spliced`, with the flow's ID).
//!
//! Anything else sends the flow back to Python unharmed (`flow_unanswered`, the socket
//! parked again, nothing read from it): an answer that is not that 200 (a refusal, or a 200
//! with other fields), a reset, a lost connection, or no answer within the timeout. The
//! stream is cancelled both ways (H3_REQUEST_CANCELLED). An answer comes with its first
//! frame as read (`answer`: whole, if it came within [`MAX_ANSWER_FRAME`] bytes), for Python
//! to decode: a refusal it can read is the flow's answer (one CONNECT per flow, as the usual
//! way); else Python opens the flow again its own way, which decodes the answer and applies
//! the cluster's retries. No HTTP/3 is parsed here beyond a frame's length: the answer is
//! compared with bytes Python encoded.

use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{Connection, ReadError, RecvStream, SendStream, VarInt, WriteError};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::engine::{lock, Event, Shared, TcpSlot};
use crate::splice::{self, Deframer, Halves, Held, SpliceHandle, H3_REQUEST_CANCELLED};

/// How long the accept loop rests after running out of descriptors or memory (the
/// connection stays in the backlog meanwhile).
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// The most accepted TCP connections an acceptor holds that Python has not taken yet: past
/// it the accept loop rests, and connections wait in the listen backlog as under asyncio's
/// server while its loop is busy. (Without it a busy Python let a local client fill the
/// process's descriptors.)
const MAX_WAITING_FOR_PYTHON: usize = 256;

/// The largest answer read before it is judged (more than any plain 200 takes).
const MAX_ANSWER: usize = 1024;

/// The largest first frame of an answer that is not the plain 200 handed to Python whole (a
/// refusal's HEADERS frame, its reason at most 512 bytes, takes well under this).
pub const MAX_ANSWER_FRAME: usize = 4096;

/// The engine's side of one listening socket: its accept loop, the accepted connections not
/// started yet, and the events of its flows.
#[derive(Debug)]
pub struct Acceptor {
    pub shared: Arc<Shared>,
    pub wake: UnixStream,
    pub address: SocketAddr,
    task: std::sync::Mutex<Option<tokio::task::AbortHandle>>,
    stopping: Arc<Stopping>,
}

/// How [`Acceptor::stop`] ends the accept loop and knows it ended.
#[derive(Debug, Default)]
struct Stopping {
    asked: tokio::sync::Notify,
    ended: std::sync::Mutex<bool>,
    ended_changed: std::sync::Condvar,
}

/// The longest [`Acceptor::stop`] waits for the accept loop to end (it ends at its next
/// turn on the engine's thread).
const STOP_WAIT: Duration = Duration::from_secs(1);

impl Acceptor {
    /// Accept on `listener` (bound and listening) from the engine's runtime.
    pub fn start(listener: std::net::TcpListener) -> std::io::Result<Self> {
        let rt = crate::engine::runtime().map_err(std::io::Error::other)?;
        let _entered = rt.enter();
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let listener = TcpListener::from_std(listener)?;
        let (shared, wake) = Shared::new()?;
        let stopping = Arc::new(Stopping::default());
        let task = rt.spawn(accept_loop(
            Arc::clone(&shared),
            listener,
            Arc::clone(&stopping),
        ));
        Ok(Acceptor {
            shared,
            wake,
            address,
            task: std::sync::Mutex::new(Some(task.abort_handle())),
            stopping,
        })
    }

    /// The events since the last call (the wake-up byte taken with them).
    pub fn take_events(&self) -> Vec<Event> {
        let mut sink = [0u8; 256];
        while matches!((&self.wake).read(&mut sink), Ok(n) if n > 0) {}
        self.shared.take_events()
    }

    /// Stop accepting and wait (at most [`STOP_WAIT`]) until the accept loop has ended:
    /// once this returns, every connection the engine accepted has its `flow_accepted`
    /// event queued, and no other follows. Flows accepted or running carry on. Blocks the
    /// calling thread (not the engine's): call it without the GIL.
    pub fn stop(&self) {
        let Some(task) = lock(&self.task).take() else {
            return;
        };
        self.stopping.asked.notify_one();
        let ended = lock(&self.stopping.ended);
        let _ = self
            .stopping
            .ended_changed
            .wait_timeout_while(ended, STOP_WAIT, |ended| !*ended);
        // (Ended by now; if the engine's thread was held up, it ends at its next turn.)
        task.abort();
    }

    /// Take an accepted connection that is not running, to start it or give it to Python.
    pub fn take(&self, flow: u64) -> Option<TcpStream> {
        match lock(&self.shared.tcp).remove(&flow) {
            Some(TcpSlot::Connected(tcp)) => Some(tcp),
            _ => None,
        }
    }

    /// Park an accepted connection again (its flow did not start).
    pub fn park(&self, flow: u64, tcp: TcpStream) {
        lock(&self.shared.tcp).insert(flow, TcpSlot::Connected(tcp));
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, stopping: Arc<Stopping>) {
    serve_accepts(&shared, &listener, &stopping).await;
    drop(listener);
    *lock(&stopping.ended) = true;
    stopping.ended_changed.notify_all();
}

async fn serve_accepts(shared: &Shared, listener: &TcpListener, stopping: &Stopping) {
    loop {
        if lock(&shared.tcp).len() >= MAX_WAITING_FOR_PYTHON {
            tokio::select! {
                biased;
                () = stopping.asked.notified() => return,
                () = tokio::time::sleep(ACCEPT_PAUSE / 10) => continue,
            }
        }
        let accepted = tokio::select! {
            biased;
            () = stopping.asked.notified() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                // As asyncio's transports: no Nagle delay on the proxied flow. (Per socket:
                // Linux gives an accepted socket its listener's TCP_NODELAY only if it was
                // set before the handshake, and the listener took connections first.)
                let _ = tcp.set_nodelay(true);
                let flow = shared.next_id();
                lock(&shared.tcp).insert(flow, TcpSlot::Connected(tcp));
                shared.push(Event::FlowAccepted { flow, peer });
            }
            Err(error) => {
                let resources = [
                    rustix::io::Errno::MFILE,
                    rustix::io::Errno::NFILE,
                    rustix::io::Errno::NOBUFS,
                    rustix::io::Errno::NOMEM,
                ];
                if resources
                    .iter()
                    .any(|errno| error.raw_os_error() == Some(errno.raw_os_error()))
                {
                    // Said to Python, which logs it (it was silent).
                    shared.push(Event::AcceptPaused {
                        message: error.to_string(),
                    });
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                }
            }
        }
    }
}

/// What an engine flow is given when Python starts it.
pub struct FlowStart {
    pub flow: u64,
    pub conn: u64,
    pub send: SendStream,
    pub recv: RecvStream,
    pub tcp: TcpStream,
    pub connection: Connection,
    /// The CONNECT's HEADERS frame.
    pub request: Bytes,
    /// The answer's HEADERS frame that lets the flow be spliced.
    pub answer: Bytes,
    pub timeout: Duration,
}

/// Register a flow about to start (where an abort goes, what it holds).
pub fn register(
    shared: &Shared,
    flow: u64,
    idle_timeout: Option<Duration>,
) -> (Arc<Held>, oneshot::Receiver<u64>) {
    let (abort_to, abort_from) = oneshot::channel();
    let held = Arc::new(Held::new(idle_timeout));
    lock(&shared.splices).insert(
        flow,
        SpliceHandle {
            abort: abort_to,
            held: Arc::clone(&held),
        },
    );
    (held, abort_from)
}

/// Send the CONNECT, wait for the answer; splice if it is the expected one, else give the
/// connection back to Python (module docs).
pub async fn run(
    shared: Arc<Shared>,
    start: FlowStart,
    held: Arc<Held>,
    mut abort: oneshot::Receiver<u64>,
) {
    let FlowStart {
        flow,
        conn,
        mut send,
        mut recv,
        tcp,
        connection,
        request,
        answer,
        timeout,
    } = start;
    let stream = u64::from(send.id());
    let aborted = async {
        match (&mut abort).await {
            Ok(code) => code,
            Err(_) => std::future::pending().await, // (its sender outlives the flow)
        }
    };
    let exchanged = tokio::select! {
        outcome = tokio::time::timeout(timeout, exchange(&mut send, &mut recv, request, &answer)) => {
            Ok(outcome.unwrap_or_else(|_| {
                Err(NoAnswer::new(Unanswered::Timeout, format!("no answer within {}s", timeout.as_secs_f64())))
            }))
        }
        code = aborted => Err(code),
    };
    if matches!(exchanged, Ok(Err(_))) {
        // Unanswered: no abort can come from now on (`abort` finds no flow)...
        lock(&shared.splices).remove(&flow);
    }
    // ...and one that came with the exchange's end is still an abort (as
    // `connect_and_run`).
    let (halves, abort) = match exchanged
        .and_then(|outcome| abort.try_recv().map_or(Ok(outcome), Err))
    {
        // Python gave the flow up: both sides are reset, as an aborted splice's.
        Err(code) => (Halves::aborted(send, recv, code), oneshot::channel().1),
        Ok(Ok(rest)) => (Halves::opened(send, recv, rest), abort),
        Ok(Err(NoAnswer {
            kind,
            reason,
            answer,
        })) => {
            let cancelled = VarInt::from_u64(H3_REQUEST_CANCELLED).unwrap_or(VarInt::from_u32(0));
            let _ = send.reset(cancelled);
            let _ = recv.stop(cancelled);
            lock(&shared.tcp).insert(flow, TcpSlot::Connected(tcp));
            shared.push(Event::FlowUnanswered {
                flow,
                stream,
                kind,
                reason,
                answer,
            });
            return;
        }
    };
    splice::carry(
        shared,
        flow,
        conn,
        stream,
        Bytes::new(),
        Bytes::new(),
        Deframer::new(),
        held,
        tcp,
        connection,
        halves,
        abort,
    )
    .await;
}

/// Why an engine flow went back to Python (`flow_unanswered`'s `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unanswered {
    /// The peer answered, with something other than the plain 200 (a refusal...).
    Answered,
    /// The peer reset the stream, or ended it, before answering.
    Reset,
    /// No answer within the timeout.
    Timeout,
    /// The connection failed (or the CONNECT could not be sent).
    Lost,
}

impl Unanswered {
    pub fn name(self) -> &'static str {
        match self {
            Unanswered::Answered => "answered",
            Unanswered::Reset => "reset",
            Unanswered::Timeout => "timeout",
            Unanswered::Lost => "lost",
        }
    }
}

/// Why an engine flow's exchange did not end in the plain 200, and the answer's first frame
/// when it was another answer (else empty).
#[derive(Debug)]
struct NoAnswer {
    kind: Unanswered,
    reason: String,
    answer: Bytes,
}

impl NoAnswer {
    fn new(kind: Unanswered, reason: impl Into<String>) -> Self {
        NoAnswer {
            kind,
            reason: reason.into(),
            answer: Bytes::new(),
        }
    }
}

/// The length of the frame `bytes` begin with (its type, length and payload), once its
/// header is in.
fn frame_length(bytes: &[u8]) -> Option<usize> {
    let (_, type_len) = splice::decode_varint(bytes)?;
    let (payload, length_len) = splice::decode_varint(&bytes[type_len..])?;
    usize::try_from(payload)
        .ok()?
        .checked_add(type_len + length_len)
}

/// Send `request` and read until the stream's first bytes are `answer` (then return what
/// followed them) or cannot be (why not; for another answer, its first frame as far as it
/// came: whole unless the stream ended, failed or passed [`MAX_ANSWER_FRAME`] first).
async fn exchange(
    send: &mut SendStream,
    recv: &mut RecvStream,
    request: Bytes,
    answer: &[u8],
) -> Result<Bytes, NoAnswer> {
    send.write_chunk(request).await.map_err(|error| {
        let kind = match error {
            WriteError::Stopped(_) => Unanswered::Reset,
            _ => Unanswered::Lost,
        };
        NoAnswer::new(kind, format!("the CONNECT could not be sent: {error}"))
    })?;
    let mut got = BytesMut::new();
    let mut other = false;
    loop {
        if other {
            match frame_length(&got) {
                Some(whole) if got.len() >= whole => {
                    got.truncate(whole);
                    return Err(other_answer(got.freeze()));
                }
                Some(whole) if whole > MAX_ANSWER_FRAME => return Err(other_answer(Bytes::new())),
                _ if got.len() >= MAX_ANSWER_FRAME => return Err(other_answer(Bytes::new())),
                _ => {}
            }
        } else if got.len() >= answer.len() {
            return Ok(got.split_off(answer.len()).freeze());
        }
        match recv.read_chunk(MAX_ANSWER, true).await {
            Ok(Some(chunk)) => got.extend_from_slice(&chunk.bytes),
            // Another answer cut short: it is Python's to read again.
            Ok(None) | Err(_) if other => return Err(other_answer(Bytes::new())),
            Ok(None) => {
                return Err(NoAnswer::new(
                    Unanswered::Reset,
                    "the stream ended before its answer",
                ))
            }
            Err(ReadError::Reset(code)) => {
                return Err(NoAnswer::new(
                    Unanswered::Reset,
                    format!(
                        "stream {} reset by peer (error code {:#x}) before its answer",
                        u64::from(recv.id()),
                        code.into_inner()
                    ),
                ))
            }
            Err(error) => {
                return Err(NoAnswer::new(
                    Unanswered::Lost,
                    format!("no answer: {error}"),
                ))
            }
        }
        let compared = got.len().min(answer.len());
        other = other || got[..compared] != answer[..compared];
    }
}

fn other_answer(frame: Bytes) -> NoAnswer {
    NoAnswer {
        kind: Unanswered::Answered,
        reason: "the answer is not the plain 200 expected".into(),
        answer: frame,
    }
}

#[cfg(test)]
mod tests {
    use super::frame_length;
    use crate::splice::encode_varint;

    #[test]
    fn a_frames_length_is_known_once_its_header_is_in() {
        let mut frame = Vec::new();
        encode_varint(0x01, &mut frame);
        encode_varint(300, &mut frame);
        let header = frame.len();
        assert_eq!(header, 3);
        frame.extend(std::iter::repeat_n(0u8, 300));
        assert_eq!(frame_length(&frame), Some(303));
        assert_eq!(frame_length(&frame[..header]), Some(303));
        assert_eq!(frame_length(&frame[..header - 1]), None);
        assert_eq!(frame_length(&[]), None);
    }
}

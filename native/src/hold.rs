//! Holding a 0-RTT client's first flight until Python has queued its requests.
//!
//! quinn starts a connection's driver as the connection is made, and the driver sends the
//! first flight (the Initial with the ClientHello) at once: before Python, which gets the
//! connection back from that call, has opened a stream or written a byte. The requests then
//! leave in later packets, and on a path of a millisecond or less a resumed handshake
//! completes first, so quinn sends them in 1-RTT rather than 0-RTT (docs/interop.md,
//! `zerortt`). An aioquic client queues its requests before its first `transmit()`.
//!
//! So a client endpoint holds the datagrams to a destination it starts a 0-RTT connection
//! to ([`HeldDestinations::hold`]) until Python's commands of that turn of its event loop
//! have run ([`HeldDestinations::release_all`], queued after them) or [`HOLD_AT_MOST`] has
//! passed. The socket's `try_send` answers a held datagram `WouldBlock` and its poller
//! reports the socket not writable until the release wakes it: quinn keeps the datagram and
//! sends it then (`drive_transmit` retries the transmit it could not send), followed by
//! whatever the requests made. Other connections of the endpoint to the same destination
//! wait with it, for that moment.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Waker};
use std::time::Duration;

/// The longest a first flight is held when Python queues nothing after the connect.
pub const HOLD_AT_MOST: Duration = Duration::from_millis(5);

thread_local! {
    /// The destination of the datagram this thread's last `try_send` held: quinn asks the
    /// poller of the same connection, on the same thread, right after (`drive_transmit`).
    static JUST_HELD: Cell<Option<SocketAddr>> = const { Cell::new(None) };
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The destinations whose datagrams an endpoint holds back, and the drivers waiting.
#[derive(Debug, Default)]
pub struct HeldDestinations {
    /// Destination -> the holds on it (connections started to it and not released).
    held: Mutex<HashMap<SocketAddr, HashSet<u64>>>,
    /// Whether `held` has any entry, set under its lock: every datagram's `try_send` asks,
    /// and almost always nothing is held, so it asks without taking the lock.
    any_held: AtomicBool,
    next_hold: AtomicU64,
    /// Drivers told their socket is not writable, to wake at a release. Locked before
    /// `held` is read by a poller, and after `held` is changed by a release: a poller that
    /// saw a hold has registered before the release that ends it wakes the waiting ones.
    waiting: Mutex<Vec<Waker>>,
}

impl HeldDestinations {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Hold datagrams to `destination` until this hold (the number returned) or every hold
    /// is released.
    pub fn hold(&self, destination: SocketAddr) -> u64 {
        let hold = self.next_hold.fetch_add(1, Ordering::Relaxed);
        let mut held = lock(&self.held);
        held.entry(destination).or_default().insert(hold);
        self.any_held.store(true, Ordering::Release);
        hold
    }

    /// Undo the [`Self::hold`] numbered `hold` (its timer's; gone after a `release_all`, and
    /// a later connection's hold on the same destination is not this one).
    pub fn release(&self, destination: SocketAddr, hold: u64) {
        {
            let mut held = lock(&self.held);
            let Some(holds) = held.get_mut(&destination) else {
                return;
            };
            if !holds.remove(&hold) {
                return;
            }
            if !holds.is_empty() {
                return;
            }
            held.remove(&destination);
            self.any_held.store(!held.is_empty(), Ordering::Release);
        }
        self.wake_waiting();
    }

    /// Release every hold.
    pub fn release_all(&self) {
        {
            let mut held = lock(&self.held);
            if held.is_empty() {
                return;
            }
            held.clear();
            self.any_held.store(false, Ordering::Release);
        }
        self.wake_waiting();
    }

    fn wake_waiting(&self) {
        for waker in std::mem::take(&mut *lock(&self.waiting)) {
            waker.wake();
        }
    }

    fn is_held(&self, destination: SocketAddr) -> bool {
        lock(&self.held).contains_key(&destination)
    }

    /// (the socket's `try_send`) Whether to hold back a datagram to `destination`; if so, the
    /// poller's next look on this thread reports the socket not writable.
    pub fn holds(&self, destination: SocketAddr) -> bool {
        if !self.any_held.load(Ordering::Acquire) || !self.is_held(destination) {
            return false;
        }
        JUST_HELD.with(|just| just.set(Some(destination)));
        true
    }

    /// (the poller's `poll_writable`) True when the datagram this thread's driver could not
    /// send is still held: the driver waits (woken by the release).
    pub fn still_holding(&self, cx: &Context) -> bool {
        let Some(destination) = JUST_HELD.with(Cell::take) else {
            return false;
        };
        let mut waiting = lock(&self.waiting);
        if !self.is_held(destination) {
            return false;
        }
        if !waiting.iter().any(|w| w.will_wake(cx.waker())) {
            waiting.push(cx.waker().clone());
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_held_destination_waits_until_released_and_others_pass() {
        let held = HeldDestinations::new();
        let a: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2000".parse().unwrap();
        let woken = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&woken));
        let cx = Context::from_waker(&waker);
        assert!(!held.holds(a));
        assert!(!held.still_holding(&cx));
        let first = held.hold(a);
        assert!(!held.holds(b));
        assert!(!held.still_holding(&cx));
        assert!(held.holds(a));
        assert!(held.still_holding(&cx));
        assert!(!held.still_holding(&cx), "asked once per held datagram");
        held.release_all();
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        assert!(!held.holds(a));
        // The first hold's timer, after a release_all, does not end a later hold.
        let later = held.hold(a);
        held.release(a, first);
        assert!(held.holds(a));
        held.release(a, later);
        assert!(!held.holds(a));
    }

    #[test]
    fn a_release_between_the_send_and_the_poll_is_not_lost() {
        let held = HeldDestinations::new();
        let a: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let woken = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&woken));
        let cx = Context::from_waker(&waker);
        let one = held.hold(a);
        let two = held.hold(a);
        assert!(held.holds(a));
        held.release(a, one);
        assert!(held.still_holding(&cx), "one hold is left");
        held.release(a, two);
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        assert!(!held.holds(a));
        let three = held.hold(a);
        assert!(held.holds(a));
        held.release(a, three);
        assert!(
            !held.still_holding(&cx),
            "released before the poll: the driver sends"
        );
    }
}

//! When an endpoint's UDP sockets are closed, so its port can be bound again.
//!
//! quinn keeps an endpoint's socket after `Endpoint::close()`: its driver and every
//! connection's state hold it until the closed connections have drained (three probe timeouts,
//! RFC 9000 section 10.2), and a reader of the old socket may hold it for a rebinding's grace
//! period ([`crate::rebind`]). A listener's `wait_closed()` returns once the port is free, as a
//! TCP listener's does, so each socket the endpoint binds carries a [`SocketHold`] of the
//! endpoint's [`OpenSockets`], given back when the socket's last holder lets it go.

use std::sync::{Arc, Condvar, Mutex, PoisonError};

use crate::engine::lock;
use std::time::{Duration, Instant};

/// How many of one endpoint's UDP sockets are still open.
#[derive(Debug, Default)]
pub struct OpenSockets {
    count: Mutex<usize>,
    changed: Condvar,
}

impl OpenSockets {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Count a socket open until the returned hold (and every clone of it) is dropped.
    pub fn hold(self: &Arc<Self>) -> SocketHold {
        *lock(&self.count) += 1;
        SocketHold(Arc::new(Hold(Arc::clone(self))))
    }

    /// Block until no socket is open, or `timeout` has passed: whether none is.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        // (Clamped: an `Instant` that far ahead overflows and panicked.)
        let deadline = Instant::now() + timeout.min(Duration::from_secs(1 << 32));
        let mut count = lock(&self.count);
        while *count > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            count = self
                .changed
                .wait_timeout(count, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

/// One socket counted open: clone it into everything that holds the socket's descriptor.
#[derive(Debug, Clone)]
pub struct SocketHold(#[allow(dead_code)] Arc<Hold>);

#[derive(Debug)]
struct Hold(Arc<OpenSockets>);

impl Drop for Hold {
    fn drop(&mut self) {
        let mut count = lock(&self.0.count);
        *count = count.saturating_sub(1);
        self.0.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_once_every_clone_of_every_hold_is_dropped() {
        let sockets = OpenSockets::new();
        assert!(sockets.wait_closed(Duration::ZERO));
        let first = sockets.hold();
        let copy = first.clone();
        let second = sockets.hold();
        drop(first);
        drop(second);
        assert!(!sockets.wait_closed(Duration::from_millis(10)));
        let waiter = {
            let sockets = Arc::clone(&sockets);
            std::thread::spawn(move || sockets.wait_closed(Duration::from_secs(10)))
        };
        drop(copy);
        assert!(waiter.join().unwrap());
    }
}

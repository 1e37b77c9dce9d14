//! The server's session tickets: single use (rustls takes a stored ticket when a client
//! resumes with it) and expiring.
//!
//! rustls keeps stateful TLS 1.3 tickets until its cache evicts them and announces a
//! lifetime of 24 hours to clients; it checks a ticket's age only for 0-RTT freshness
//! (the client's and server's view of it within a few seconds), not against a lifetime.
//! quicmesh's aioquic servers redeem a ticket for an hour (`DEFAULT_TICKET_LIFETIME` in
//! `quicmesh/transport/tickets.py`); this store gives the native server the same bound: it
//! records when each ticket was stored and treats one older than [`TICKET_LIFETIME`] as
//! gone (the client then does a full handshake, its 0-RTT refused, sent again in 1-RTT).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::server::{ServerSessionMemoryCache, StoresServerSessions};

/// How long after issuing a ticket the server accepts it (as the aioquic engine's servers).
pub const TICKET_LIFETIME: Duration = Duration::from_secs(3600);

/// Bytes before each stored value: milliseconds since the store's `epoch` when it was put.
const STAMP: usize = 8;

/// rustls's in-memory session cache, each value stamped with the time it was stored.
#[derive(Debug)]
pub struct ExpiringSessions {
    stored: Arc<ServerSessionMemoryCache>,
    epoch: Instant,
    lifetime: Duration,
}

impl ExpiringSessions {
    /// A store of at most `capacity` tickets (the oldest evicted first), each good for
    /// `lifetime` after it was stored.
    pub fn new(capacity: usize, lifetime: Duration) -> Self {
        Self {
            stored: ServerSessionMemoryCache::new(capacity),
            epoch: Instant::now(),
            lifetime,
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The value of a stamped entry, if it is younger than the lifetime.
    fn fresh(&self, entry: Vec<u8>) -> Option<Vec<u8>> {
        let stamp = u64::from_le_bytes(entry.get(..STAMP)?.try_into().ok()?);
        let lifetime = u64::try_from(self.lifetime.as_millis()).unwrap_or(u64::MAX);
        (self.now().saturating_sub(stamp) < lifetime).then(|| entry[STAMP..].to_vec())
    }
}

impl StoresServerSessions for ExpiringSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let mut entry = Vec::with_capacity(STAMP + value.len());
        entry.extend_from_slice(&self.now().to_le_bytes());
        entry.extend_from_slice(&value);
        self.stored.put(key, entry)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.fresh(self.stored.get(key)?)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.fresh(self.stored.take(key)?)
    }

    fn can_cache(&self) -> bool {
        self.stored.can_cache()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_is_taken_once_within_its_lifetime() {
        let store = ExpiringSessions::new(4, TICKET_LIFETIME);
        assert!(store.put(b"id".to_vec(), b"session".to_vec()));
        assert_eq!(store.get(b"id").as_deref(), Some(&b"session"[..]));
        assert_eq!(store.take(b"id").as_deref(), Some(&b"session"[..]));
        assert_eq!(store.take(b"id"), None);
    }

    #[test]
    fn a_ticket_past_its_lifetime_is_not_redeemed() {
        // A lifetime of zero: every ticket is past it as soon as it is stored.
        let store = ExpiringSessions::new(4, Duration::ZERO);
        assert!(store.put(b"old".to_vec(), b"session".to_vec()));
        assert_eq!(store.get(b"old"), None);
        assert_eq!(store.take(b"old"), None);
    }
}

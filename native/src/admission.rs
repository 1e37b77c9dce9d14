//! Admission of new connections on a native listener: the rules of the aioquic listener
//! (`quicmesh/transport/_admission.py`) applied to quinn's [`quinn::Incoming`].
//!
//! * **Half-open caps.** A connection is half-open from its first Initial until its handshake
//!   completes (or fails, or times out). At most `max_half_open` per listener and
//!   `max_half_open_per_source` per source IP; Initials beyond are ignored (no answer, no state).
//! * **Retry** (RFC 9000 8.1.2): `Always`, or `Auto` while `retry_threshold` or more connections
//!   are half-open. quinn makes and checks the tokens (stateless, bound to the client's address,
//!   expiring); an Initial with a valid token is admitted without a second Retry.
//! * **Handshake timeout**: a half-open connection is dropped after `handshake_timeout`.
//!
//! What happened is reported as [`Event::Admission`] with the name of the counter it adds to
//! (the names of `ADMISSION_COUNTERS` in Python).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::engine::{classify, lock, undecryptable, Event, Shared};

/// When to answer a new client with a Retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryMode {
    /// While `retry_threshold` connections are half-open.
    Auto,
    Always,
    Never,
}

impl RetryMode {
    /// Parse `auto`, `always` or `never`.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "auto" => Ok(RetryMode::Auto),
            "always" => Ok(RetryMode::Always),
            "never" => Ok(RetryMode::Never),
            other => Err(format!(
                "retry must be one of auto, always, never, not '{other}'"
            )),
        }
    }
}

/// The limits on connections that have not completed their handshake.
#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    pub retry: RetryMode,
    pub retry_threshold: usize,
    pub max_half_open: usize,
    pub max_half_open_per_source: usize,
    pub handshake_timeout: Duration,
}

impl Default for AdmissionConfig {
    /// The defaults of `AdmissionConfig` in Python.
    fn default() -> Self {
        AdmissionConfig {
            retry: RetryMode::Auto,
            retry_threshold: 64,
            max_half_open: 1024,
            max_half_open_per_source: 128,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl AdmissionConfig {
    /// Check the limits (each at least 1, a positive timeout).
    pub fn check(&self) -> Result<(), String> {
        for (name, value) in [
            ("retry_threshold", self.retry_threshold),
            ("max_half_open", self.max_half_open),
            ("max_half_open_per_source", self.max_half_open_per_source),
        ] {
            if value < 1 {
                return Err(format!("{name} must be a whole number >= 1, not {value}"));
            }
        }
        if self.handshake_timeout.is_zero() {
            return Err("handshake_timeout must be > 0 s".to_owned());
        }
        Ok(())
    }
}

/// What to do with a new client's Initial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Admit,
    Retry,
    Refuse,
}

#[derive(Debug, Default)]
struct HalfOpen {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// The half-open connections of one listener and the decision for each new one.
#[derive(Debug)]
pub struct Admission {
    pub config: AdmissionConfig,
    half_open: Mutex<HalfOpen>,
}

impl Admission {
    pub fn new(config: AdmissionConfig) -> Arc<Self> {
        Arc::new(Admission {
            config,
            half_open: Mutex::new(HalfOpen::default()),
        })
    }

    /// Connections admitted whose handshake has not completed.
    pub fn half_open(&self) -> usize {
        lock(&self.half_open).total
    }

    /// Decide for an Initial from `source`; `validated`: it carried a valid Retry token.
    pub fn decide(&self, source: IpAddr, validated: bool) -> Decision {
        let half_open = lock(&self.half_open);
        let config = &self.config;
        if half_open.total >= config.max_half_open
            || half_open.per_source.get(&source).copied().unwrap_or(0)
                >= config.max_half_open_per_source
        {
            return Decision::Refuse;
        }
        if validated || config.retry == RetryMode::Never {
            return Decision::Admit;
        }
        if config.retry == RetryMode::Always || half_open.total >= config.retry_threshold {
            return Decision::Retry;
        }
        Decision::Admit
    }

    /// A half-open connection from `source` was created: it holds its place until the
    /// returned slot is dropped (handshake completed, failed or timed out).
    pub fn open(self: &Arc<Self>, source: IpAddr) -> HalfOpenSlot {
        let mut half_open = lock(&self.half_open);
        half_open.total += 1;
        *half_open.per_source.entry(source).or_insert(0) += 1;
        HalfOpenSlot {
            admission: Arc::clone(self),
            source,
        }
    }
}

/// One half-open connection's place in the caps, released when dropped.
#[derive(Debug)]
pub struct HalfOpenSlot {
    admission: Arc<Admission>,
    source: IpAddr,
}

impl Drop for HalfOpenSlot {
    fn drop(&mut self) {
        let mut half_open = lock(&self.admission.half_open);
        half_open.total = half_open.total.saturating_sub(1);
        if let Some(count) = half_open.per_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                half_open.per_source.remove(&self.source);
            }
        }
    }
}

/// Report one admission outcome (`counter` is one of Python's `ADMISSION_COUNTERS`).
pub fn count(shared: &Shared, counter: &'static str, source: SocketAddr) {
    shared.push(Event::Admission { counter, source });
}

/// Makes one connection's own server configuration (e.g. with its qlog file), or None: the
/// endpoint's.
pub type ConfigFactory = Arc<dyn Fn() -> Option<Arc<quinn::ServerConfig>> + Send + Sync>;

/// Serve quinn's new connections on `endpoint` through `admission` until the endpoint closes
/// (`per_connection`: each admitted connection's configuration, when not the endpoint's).
pub async fn serve(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    admission: Arc<Admission>,
    early_data: bool,
    per_connection: Option<ConfigFactory>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let source = incoming.remote_address();
        match admission.decide(source.ip(), incoming.remote_address_validated()) {
            Decision::Refuse => {
                // As the aioquic listener: no answer (a refusal would be sent to a source
                // that may be spoofed), nothing kept.
                incoming.ignore();
                count(&shared, "initials_refused_half_open", source);
            }
            Decision::Retry if incoming.may_retry() => match incoming.retry() {
                Ok(()) => count(&shared, "retries_sent", source),
                Err(error) => error.into_incoming().ignore(),
            },
            // quinn decrypts the Initial here: one that does not (forged, corrupted) leaves
            // nothing behind and never takes a half-open slot.
            Decision::Retry | Decision::Admit => {
                let accepted = match per_connection.as_ref().and_then(|make| make()) {
                    Some(config) => incoming.accept_with(config),
                    None => incoming.accept(),
                };
                match accepted {
                    Ok(connecting) => {
                        let slot = admission.open(source.ip());
                        let timeout = admission.config.handshake_timeout;
                        let shared = Arc::clone(&shared);
                        tokio::spawn(shared.accept(connecting, early_data, slot, timeout));
                    }
                    Err(error) if undecryptable(&error) => {
                        count(&shared, "initials_undecryptable", source);
                    }
                    Err(error) => {
                        let (kind, message) = classify(&error);
                        shared.push(Event::AcceptFailed {
                            kind,
                            message,
                            source,
                        });
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AdmissionConfig {
        AdmissionConfig {
            retry: RetryMode::Auto,
            retry_threshold: 2,
            max_half_open: 4,
            max_half_open_per_source: 3,
            handshake_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn caps_per_source_and_per_listener() {
        let admission = Admission::new(AdmissionConfig {
            retry: RetryMode::Never,
            ..config()
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mut slots = Vec::new();
        for _ in 0..3 {
            assert_eq!(admission.decide(a, false), Decision::Admit);
            slots.push(admission.open(a));
        }
        assert_eq!(admission.decide(a, false), Decision::Refuse);
        assert_eq!(admission.decide(b, false), Decision::Admit);
        slots.push(admission.open(b));
        assert_eq!(admission.decide(b, false), Decision::Refuse, "listener cap");
        slots.pop();
        assert_eq!(admission.decide(b, false), Decision::Admit);
        slots.clear();
        assert_eq!(admission.half_open(), 0);
        assert_eq!(admission.decide(a, false), Decision::Admit);
    }

    #[test]
    fn retry_under_load_or_always() {
        let admission = Admission::new(config());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(admission.decide(a, false), Decision::Admit);
        let _slots = [admission.open(a), admission.open(a)];
        assert_eq!(admission.decide(a, false), Decision::Retry);
        assert_eq!(
            admission.decide(a, true),
            Decision::Admit,
            "token validated"
        );
        let always = Admission::new(AdmissionConfig {
            retry: RetryMode::Always,
            ..config()
        });
        assert_eq!(always.decide(a, false), Decision::Retry);
        assert_eq!(always.decide(a, true), Decision::Admit);
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(RetryMode::parse("sometimes")
            .unwrap_err()
            .contains("sometimes"));
        let bad = AdmissionConfig {
            max_half_open: 0,
            ..config()
        };
        assert!(bad.check().unwrap_err().contains("max_half_open"));
        let zero = AdmissionConfig {
            handshake_timeout: Duration::ZERO,
            ..config()
        };
        assert!(zero.check().is_err());
    }
}

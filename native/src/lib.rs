//! `quicmesh._native`: quicmesh's native QUIC engine (quinn + rustls) as a Python module.
//!
//! One [`Endpoint`] owns a UDP socket; quinn runs its I/O, protection, ACKs, recovery and pacing
//! on a tokio thread without the GIL. Python issues commands (each returns at once) and learns
//! what happened from `drain()`, a batch of event tuples, after `fileno()` turned readable.
//! The asyncio adaptor is `quicmesh/transport/native.py`; this layer has no policy of its own.
//!
//! Errors raised here are quicmesh's own exceptions (`quicmesh.errors`), built at the boundary;
//! nothing panics across it (PyO3 would turn a panic into `PanicException`, but no code path
//! here unwraps).

#![forbid(unsafe_code)]

pub mod admission;
pub mod bbr;
pub mod engine;
pub mod hold;
pub mod icmp;
pub mod outbound;
pub mod rebind;
pub mod release;
pub mod splice;
pub mod tickets;
pub mod verify;

use std::future::Future;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use pyo3::IntoPyObjectExt;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::VarInt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use admission::{Admission, AdmissionConfig, RetryMode};
use engine::{
    lock, runtime, Event, RecvCmd, RecvHandover, SendCmd, Shared, TcpSlot, TransportOptions,
};
use hold::HeldDestinations;
use release::OpenSockets;
use verify::{SpiffeVerifier, TrustRoot, SPIFFE_SCHEME_PREFIX};

/// quinn's default max_udp_payload_size: a 1500-byte Ethernet MTU less the IPv4 and UDP
/// headers.
const MAX_UDP_PAYLOAD: u16 = 1472;

/// Build one of `quicmesh.errors`' exceptions carrying `message`.
fn quicmesh_error(name: &str, message: impl Into<String>) -> PyErr {
    let message = message.into();
    Python::with_gil(|py| {
        match py
            .import("quicmesh.errors")
            .and_then(|module| module.getattr(name))
            .and_then(|class| class.call1((message.clone(),)))
        {
            Ok(instance) => PyErr::from_value(instance),
            Err(error) => error,
        }
    })
}

fn config_error(message: impl Into<String>) -> PyErr {
    quicmesh_error("ConfigError", message)
}

/// A TCP socket for a connect to `address`, made on the caller's (Python's) thread: a socket
/// belongs to the network namespace of the thread that creates it, and the engine's thread
/// may have started in another.
fn tcp_socket(address: std::net::SocketAddr) -> PyResult<tokio::net::TcpSocket> {
    if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|e| quicmesh_error("ConnectError", format!("cannot connect to {address}: {e}")))
}

/// Where an endpoint socket's ICMP unreachable errors go: to the connections to that address
/// ([`Shared::unreachable`]), while the endpoint lives.
fn icmp_sink(shared: &Arc<Shared>) -> icmp::Sink {
    let shared = Arc::downgrade(shared);
    Arc::new(move |error| {
        if let Some(shared) = shared.upgrade() {
            shared.unreachable(error);
        }
    })
}

/// The certificates of a PEM bundle, in order.
fn pem_certificates(pem: &[u8], what: &str) -> PyResult<Vec<CertificateDer<'static>>> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| config_error(format!("{what}: not valid PEM: {e}")))?;
    if certificates.is_empty() {
        return Err(config_error(format!("{what}: holds no certificate")));
    }
    Ok(certificates)
}

/// The roots of a trust bundle PEM, each with the trust domain its own `spiffe://` URI SAN names
/// (as `quicmesh.tls.identity.TrustBundle.trust_domains_for` reads it; none: any domain).
fn trust_roots(pem: &[u8]) -> PyResult<Vec<TrustRoot>> {
    pem_certificates(pem, "trust bundle")?
        .into_iter()
        .map(|der| {
            let uris = verify::uri_sans_of(der.as_ref())
                .map_err(|e| config_error(format!("trust bundle: {e}")))?;
            let trust_domain = uris.iter().find_map(|uri| {
                let domain = uri.strip_prefix(SPIFFE_SCHEME_PREFIX)?.split('/').next()?;
                (!domain.is_empty()).then(|| domain.to_owned())
            });
            Ok(TrustRoot { der, trust_domain })
        })
        .collect()
}

/// `chunks` as one Python `bytes`.
fn joined<'py>(py: Python<'py>, chunks: &[Bytes]) -> PyResult<Bound<'py, PyBytes>> {
    let total = chunks.iter().map(Bytes::len).sum();
    PyBytes::new_with(py, total, |buffer| {
        let mut at = 0;
        for chunk in chunks {
            buffer[at..at + chunk.len()].copy_from_slice(chunk);
            at += chunk.len();
        }
        Ok(())
    })
}

fn event_tuple(py: Python<'_>, event: Event) -> PyResult<PyObject> {
    match event {
        Event::Connected { token, conn, early } => {
            ("connected", token, conn, early).into_py_any(py)
        }
        Event::ConnectFailed {
            token,
            kind,
            message,
        } => ("connect_failed", token, kind.name(), message).into_py_any(py),
        Event::Accepted { conn, early } => ("accepted", conn, early).into_py_any(py),
        Event::HandshakeDone { conn, received } => {
            ("handshake_done", conn, received).into_py_any(py)
        }
        Event::Admission { counter, source } => {
            ("admission", counter, source.ip().to_string()).into_py_any(py)
        }
        Event::EarlyData { conn, accepted } => ("early_data", conn, accepted).into_py_any(py),
        Event::EarlyDataRejected { conn, stream } => {
            ("early_data_rejected", conn, stream).into_py_any(py)
        }
        Event::AcceptFailed {
            kind,
            message,
            source,
        } => ("accept_failed", kind.name(), message, source.to_string()).into_py_any(py),
        Event::StreamOpened {
            token,
            conn,
            stream,
        } => ("stream_opened", token, conn, stream).into_py_any(py),
        Event::OpenFailed {
            token,
            conn,
            message,
        } => ("open_failed", token, conn, message).into_py_any(py),
        Event::StreamAccepted {
            conn,
            stream,
            bidirectional,
            read_started,
            permit_used,
        } => (
            "stream_accepted",
            conn,
            stream,
            bidirectional,
            read_started,
            permit_used,
        )
            .into_py_any(py),
        Event::Data {
            conn,
            stream,
            chunks,
            fin,
        } => ("data", conn, stream, joined(py, &chunks)?, fin).into_py_any(py),
        Event::Ready {
            conn,
            stream,
            chunks,
            fin,
        } => ("ready", conn, stream, joined(py, &chunks)?, fin).into_py_any(py),
        Event::Written {
            conn,
            stream,
            bytes,
        } => ("written", conn, stream, bytes).into_py_any(py),
        Event::SendAcked { conn, stream } => ("send_acked", conn, stream).into_py_any(py),
        Event::ResetReceived { conn, stream, code } => {
            ("reset_received", conn, stream, code).into_py_any(py)
        }
        Event::StopSendingReceived { conn, stream, code } => {
            ("stop_sending_received", conn, stream, code).into_py_any(py)
        }
        Event::ReadPaused { conn, stream } => ("read_paused", conn, stream).into_py_any(py),
        Event::Spliced {
            id,
            conn,
            stream,
            sent,
            received,
            error,
            code,
            connected,
        } => (
            "spliced", conn, id, stream, sent, received, error, code, connected,
        )
            .into_py_any(py),
        Event::Path { conn, change, addr } => {
            (change.name(), conn, addr.ip().to_string(), addr.port()).into_py_any(py)
        }
        Event::ConnectUnreachable {
            token,
            errno,
            detail,
        } => ("connect_unreachable", token, errno, detail).into_py_any(py),
        Event::Unreachable {
            conn,
            errno,
            detail,
        } => ("unreachable", conn, errno, detail).into_py_any(py),
        Event::TcpConnected {
            token,
            errno,
            message,
        } => ("tcp_connected", token, errno, message).into_py_any(py),
        Event::SpliceUnconnected {
            id,
            conn,
            stream,
            errno,
            message,
        } => ("splice_unconnected", conn, id, stream, errno, message).into_py_any(py),
        Event::Closed {
            conn,
            kind,
            message,
            code,
        } => ("closed", conn, kind.name(), message, code).into_py_any(py),
        Event::FlowAccepted { flow, peer } => {
            ("flow_accepted", flow, peer.ip().to_string(), peer.port()).into_py_any(py)
        }
        Event::AcceptPaused { message } => ("accept_paused", message).into_py_any(py),
        Event::FlowUnanswered {
            flow,
            stream,
            kind,
            reason,
            answer,
        } => (
            "flow_unanswered",
            flow,
            stream,
            kind.name(),
            reason,
            PyBytes::new(py, &answer),
        )
            .into_py_any(py),
    }
}

fn varint(name: &str, value: u64) -> PyResult<VarInt> {
    VarInt::from_u64(value).map_err(|_| config_error(format!("{name} {value} exceeds 2^62-1")))
}

/// The longest duration the engine takes (about 31 years): a timer set that far ahead
/// overflows no clock (quinn adds a keep-alive interval of 1e19 s to `Instant::now()` and
/// panicked on the engine thread, which aborted the process).
const MAX_SECONDS: f64 = 1e9;

fn seconds(value: Option<f64>, name: &str) -> PyResult<Option<Duration>> {
    value
        .map(|s| {
            if s > MAX_SECONDS {
                return Err(config_error(format!(
                    "{name} must be at most {MAX_SECONDS:e} seconds"
                )));
            }
            Duration::try_from_secs_f64(s).map_err(|_| {
                config_error(format!("{name} must be a non-negative number of seconds"))
            })
        })
        .transpose()
}

/// Builds the client TLS configuration, with the server identities a connection allows and
/// whether it may resume a session (with 0-RTT) from a ticket.
type ClientCrypto =
    dyn Fn(Option<Vec<String>>, bool) -> Result<Arc<QuicClientConfig>, String> + Send + Sync;

/// The ticket store of a connection that must not resume (a full handshake: the server's
/// certificate is verified again): it offers no ticket, and keeps those the server sends
/// for the resumptions asked for later.
#[derive(Debug)]
struct KeepTickets(Arc<dyn rustls::client::ClientSessionStore>);

impl rustls::client::ClientSessionStore for KeepTickets {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: rustls::NamedGroup) {
        self.0.set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.0.kx_hint(server_name)
    }

    fn set_tls12_session(
        &self,
        _server_name: ServerName<'static>,
        _value: rustls::client::Tls12ClientSessionValue,
    ) {
    }

    fn tls12_session(
        &self,
        _server_name: &ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _server_name: &ServerName<'static>) {}

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.0.insert_tls13_ticket(server_name, value);
    }

    fn take_tls13_ticket(
        &self,
        _server_name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        None
    }
}

/// The most client TLS configurations (one per list of allowed server identities) kept.
const CLIENT_CONFIGS: usize = 64;

/// New connections (an Initial each, about 1.2 KB) quinn queues for the admission loop.
const MAX_INCOMING: usize = 4096;

/// Bytes quinn buffers for one new connection before it is accepted (early 0-RTT packets).
const INCOMING_BUFFER_BYTES: u64 = 64 << 10;

/// Bytes quinn buffers for all new connections before they are accepted.
const INCOMING_BUFFER_BYTES_TOTAL: u64 = 16 << 20;

/// A QUIC endpoint: one UDP socket, client and (with `server=True`) server.
#[pyclass(module = "quicmesh._native", frozen)]
struct Endpoint {
    shared: Arc<Shared>,
    /// quinn's endpoint, until [`Endpoint::close`] lets it go: quinn keeps its UDP socket
    /// (the port stays bound) while any handle to the endpoint lives, and Python may keep
    /// this object long after it closed it (a reload's replaced listener or cluster).
    endpoint: Mutex<Option<quinn::Endpoint>>,
    /// The socket quinn uses now (what [`Endpoint::rebind`] moves from), until closed.
    socket: Mutex<Option<Arc<dyn quinn::AsyncUdpSocket>>>,
    /// Every socket the endpoint bound, counted until closed (`wait_released`).
    sockets: Arc<OpenSockets>,
    /// (client) Destinations whose datagrams wait for Python's requests ([`hold`]).
    held: Arc<HeldDestinations>,
    /// The reading end of the wake-up socket pair, until closed.
    wake: Mutex<Option<UnixStream>>,
    client_crypto: Arc<ClientCrypto>,
    transport: Arc<quinn::TransportConfig>,
    options: TransportOptions,
    early_data: bool,
    /// (server) The half-open connections and the caps on them.
    admission: Option<Arc<Admission>>,
    /// (server) What the server configuration is made of (`set_identity` makes a new one).
    server_tls: Option<Arc<ServerTls>>,
}

/// (server) The settings a server configuration is built from, kept so that a new identity
/// ([`Endpoint::set_identity`]) gets a configuration like the first one.
struct ServerTls {
    provider: Arc<rustls::crypto::CryptoProvider>,
    alpn: Vec<Vec<u8>>,
    allowed_clients: Option<Vec<String>>,
    early_data: bool,
    transport: Arc<quinn::TransportConfig>,
    /// The single-use ticket store (with `early_data`) and the trust bundle its tickets' clients
    /// were verified with: kept across a new certificate, replaced with new roots.
    session_storage: std::sync::Mutex<(Vec<u8>, Arc<tickets::ExpiringSessions>)>,
    /// The configuration new connections get now (each qlog connection takes a copy).
    current: std::sync::Mutex<Option<quinn::ServerConfig>>,
}

/// A server's ticket store: 4,096 tickets at most, each redeemable once within an hour.
fn new_ticket_store() -> Arc<tickets::ExpiringSessions> {
    Arc::new(tickets::ExpiringSessions::new(
        4096,
        tickets::TICKET_LIFETIME,
    ))
}

impl ServerTls {
    /// A server configuration presenting `chain` and `key`, requiring client certificates
    /// that chain to `roots` (the bundle `trust_pem`).
    fn build(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: &[TrustRoot],
        trust_pem: &[u8],
    ) -> PyResult<quinn::ServerConfig> {
        let verifier = SpiffeVerifier::new(roots, self.allowed_clients.clone())
            .map_err(|e| config_error(e.to_string()))?;
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_error(format!("TLS: {e}")))?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_single_cert(chain, key)
            .map_err(|e| config_error(format!("certificate and key: {e}")))?;
        tls.alpn_protocols = self.alpn.clone();
        if self.early_data {
            // Stateful tickets: rustls `take`s a ticket from this store when a client
            // resumes with it, so each ticket is good for one resumption (one 0-RTT flight),
            // within an hour (`tickets.rs`); a resumed handshake restores the client
            // certificate chain the ticket recorded.
            let mut storage = lock(&self.session_storage);
            if storage.0 != trust_pem {
                *storage = (trust_pem.to_vec(), new_ticket_store());
            }
            tls.session_storage =
                Arc::clone(&storage.1) as Arc<dyn rustls::server::StoresServerSessions>;
            tls.max_early_data_size = u32::MAX;
        } else {
            tls.send_tls13_tickets = 0;
        }
        let crypto = QuicServerConfig::try_from(tls)
            .map_err(|e| config_error(format!("TLS for QUIC: {e}")))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(Arc::clone(&self.transport));
        // New connections quinn holds before the admission loop decides on them (it
        // decides at once; these bound a burst while it is busy), and the datagrams
        // buffered for them.
        config.max_incoming(MAX_INCOMING);
        config.incoming_buffer_size(INCOMING_BUFFER_BYTES);
        config.incoming_buffer_size_total(INCOMING_BUFFER_BYTES_TOTAL);
        Ok(config)
    }
}

#[pymethods]
impl Endpoint {
    /// Bind a UDP socket on `host:port` and start the engine.
    ///
    /// `cert_chain_pem` (leaf first) and `key_pem` are this side's identity, used as a server
    /// and as a client; `trust_pem` holds the roots peers must chain to. A server requires a
    /// client certificate. `alpn` lists the protocols offered/accepted. `first_read`: read
    /// each stream the peer opens at once, up to that many bytes, without a read request
    /// (`stream_accepted` then says its read started).
    #[new]
    #[pyo3(signature = (
        host, port, *, cert_chain_pem, key_pem, trust_pem, alpn, server=false,
        allowed_clients=None, stream_receive_window=None, receive_window=None, send_window=None,
        idle_timeout=None, keep_alive=None, max_bidi_streams=None, max_uni_streams=None,
        congestion=None, early_data=false, reset_key=None, retry="auto", retry_threshold=64,
        max_half_open=1024, max_half_open_per_source=128, handshake_timeout=10.0,
        initial_mtu=None, mtu_discovery_max=None, ack_eliciting_threshold=None, qlog_dir=None,
        first_read=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        host: &str,
        port: u16,
        cert_chain_pem: &[u8],
        key_pem: &[u8],
        trust_pem: &[u8],
        alpn: Vec<Vec<u8>>,
        server: bool,
        allowed_clients: Option<Vec<String>>,
        stream_receive_window: Option<u64>,
        receive_window: Option<u64>,
        send_window: Option<u64>,
        idle_timeout: Option<f64>,
        keep_alive: Option<f64>,
        max_bidi_streams: Option<u64>,
        max_uni_streams: Option<u64>,
        congestion: Option<String>,
        early_data: bool,
        reset_key: Option<Vec<u8>>,
        retry: &str,
        retry_threshold: usize,
        max_half_open: usize,
        max_half_open_per_source: usize,
        handshake_timeout: f64,
        initial_mtu: Option<u16>,
        mtu_discovery_max: Option<u16>,
        ack_eliciting_threshold: Option<u64>,
        qlog_dir: Option<std::path::PathBuf>,
        first_read: Option<usize>,
    ) -> PyResult<Self> {
        let address = engine::socket_addr(host, port).map_err(config_error)?;
        let admission = AdmissionConfig {
            retry: RetryMode::parse(retry).map_err(config_error)?,
            retry_threshold,
            max_half_open,
            max_half_open_per_source,
            handshake_timeout: seconds(Some(handshake_timeout), "handshake_timeout")?
                .unwrap_or_default(),
        };
        admission.check().map_err(config_error)?;
        let options = TransportOptions {
            stream_receive_window,
            receive_window,
            send_window,
            idle_timeout: seconds(idle_timeout, "idle_timeout")?,
            keep_alive: seconds(keep_alive, "keep_alive")?,
            max_bidi_streams,
            max_uni_streams,
            congestion,
            initial_mtu,
            mtu_discovery_max,
            ack_eliciting_threshold,
            qlog_dir,
        };
        let transport = Arc::new(options.build().map_err(config_error)?);
        if let Some(dir) = options.qlog_dir.as_ref().filter(|dir| !dir.is_dir()) {
            return Err(config_error(format!(
                "qlog_dir {} is not a folder",
                dir.display()
            )));
        }
        let chain = pem_certificates(cert_chain_pem, "certificate chain")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| config_error(format!("private key: not a PEM private key: {e}")))?;
        let roots = trust_roots(trust_pem)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        let server_tls = if server {
            let tls = ServerTls {
                provider: Arc::clone(&provider),
                alpn: alpn.clone(),
                allowed_clients,
                early_data,
                transport: Arc::clone(&transport),
                session_storage: std::sync::Mutex::new((trust_pem.to_vec(), new_ticket_store())),
                current: std::sync::Mutex::new(None),
            };
            let config = tls.build(chain.clone(), key.clone_key(), &roots, trust_pem)?;
            *lock(&tls.current) = Some(config);
            Some(Arc::new(tls))
        } else {
            None
        };
        let server_config = server_tls
            .as_ref()
            .and_then(|tls| lock(&tls.current).clone());

        let client_provider = Arc::clone(&provider);
        let client_alpn = alpn;
        // One ticket store per endpoint (one identity): tickets are bound to this client.
        let tickets: Arc<dyn rustls::client::ClientSessionStore> =
            Arc::new(rustls::client::ClientSessionMemoryCache::new(256));
        // One TLS configuration per list of allowed server identities, kept: rustls resumes
        // a session only with the verifier and client credentials that made it. Each comes in
        // two: one that resumes and one that does a full handshake (a copy sharing the
        // verifier and credentials, so the tickets it keeps serve the first).
        let configs = std::sync::Mutex::new(std::collections::HashMap::<
            Option<Vec<String>>,
            (Arc<QuicClientConfig>, Arc<QuicClientConfig>),
        >::new());
        let client_crypto = Arc::new(move |allowed: Option<Vec<String>>, resume: bool| {
            let mut configs = lock(&configs);
            if let Some((resuming, full)) = configs.get(&allowed) {
                return Ok(Arc::clone(if resume { resuming } else { full }));
            }
            if configs.len() >= CLIENT_CONFIGS {
                configs.clear();
            }
            let verifier =
                SpiffeVerifier::new(&roots, allowed.clone()).map_err(|e| e.to_string())?;
            let mut tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&client_provider))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| format!("TLS: {e}"))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .map_err(|e| format!("certificate and key: {e}"))?;
            tls.alpn_protocols = client_alpn.clone();
            let mut full = tls.clone();
            if early_data {
                tls.resumption = rustls::client::Resumption::store(Arc::clone(&tickets));
                tls.enable_early_data = true;
                full.resumption =
                    rustls::client::Resumption::store(Arc::new(KeepTickets(Arc::clone(&tickets))));
            } else {
                tls.resumption = rustls::client::Resumption::disabled();
                full.resumption = rustls::client::Resumption::disabled();
            }
            let quic = |tls: rustls::ClientConfig| {
                QuicClientConfig::try_from(tls)
                    .map(Arc::new)
                    .map_err(|e| format!("TLS for QUIC: {e}"))
            };
            let (resuming, full) = (quic(tls)?, quic(full)?);
            let chosen = Arc::clone(if resume { &resuming } else { &full });
            configs.insert(allowed, (resuming, full));
            Ok(chosen)
        });
        // Check the client side builds now, so a bad identity fails at bind, not at connect.
        client_crypto(None, true).map_err(config_error)?;

        let socket = engine::bind_udp(address)
            .map_err(|e| config_error(format!("cannot bind UDP {address}: {e}")))?;
        let rt = runtime().map_err(|e| quicmesh_error("QuicmeshError", e))?;
        let _entered = rt.enter();
        // Stateless reset tokens are an HMAC of the connection ID: with the same key after a
        // restart, a peer's next packet on a lost connection is answered with a reset it trusts.
        let mut endpoint_config = match reset_key {
            Some(key) if key.len() < 16 => {
                return Err(config_error("reset_key must be at least 16 bytes"))
            }
            Some(key) => {
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
                // quinn drops packets whose connection ID its generator did not sign (no reset
                // for them): the generator's key must survive the restart too.
                let tag = ring::hmac::sign(&key, b"quicmesh connection ID generator");
                let mut cid_key = [0u8; 8];
                cid_key.copy_from_slice(&tag.as_ref()[..8]);
                let cid_key = u64::from_le_bytes(cid_key);
                let mut config = quinn::EndpointConfig::new(Arc::new(key));
                config.cid_generator(move || {
                    Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
                });
                config
            }
            None => quinn::EndpointConfig::default(),
        };
        // The largest UDP payload we accept (the max_udp_payload_size transport parameter):
        // the peer's path MTU discovery probes up to it, so it is at least what ours probes.
        if let Some(max) = options
            .mtu_discovery_max
            .filter(|max| *max > MAX_UDP_PAYLOAD)
        {
            endpoint_config
                .max_udp_payload_size(max)
                .map_err(|e| config_error(format!("mtu_discovery_max {max}: {e}")))?;
        }
        let qlog_server = server_tls.clone().filter(|_| options.qlog_dir.is_some());
        let (shared, wake) =
            Shared::new().map_err(|e| quicmesh_error("QuicmeshError", e.to_string()))?;
        shared.set_max_bidi_streams(options.max_bidi_streams);
        shared.set_first_read(first_read);
        let sockets = OpenSockets::new();
        let held = HeldDestinations::new();
        let socket = icmp::ErrorQueueSocket::wrap(
            socket,
            icmp_sink(&shared),
            sockets.hold(),
            Arc::clone(&held),
        )
        .map_err(|e| config_error(format!("cannot start QUIC on {address}: {e}")))?;
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            server_config,
            Arc::clone(&socket),
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| config_error(format!("cannot start QUIC on {address}: {e}")))?;
        let admission = server.then(|| Admission::new(admission));
        if let Some(admission) = &admission {
            // With qlog, each connection gets its own configuration (its own file); a file
            // that cannot be made (the folder was checked above) costs the connection its
            // qlog, not its service.
            let per_connection: Option<admission::ConfigFactory> = qlog_server.map(|tls| {
                let options = options.clone();
                let ids = Arc::clone(&shared);
                Arc::new(move || {
                    let transport = options.build_for_connection("server", ids.next_id()).ok()?;
                    // The identity of the moment (set_identity replaces it).
                    let mut config = lock(&tls.current).clone()?;
                    config.transport_config(transport);
                    Some(Arc::new(config))
                }) as admission::ConfigFactory
            });
            rt.spawn(admission::serve(
                endpoint.clone(),
                Arc::clone(&shared),
                Arc::clone(admission),
                early_data,
                per_connection,
            ));
        }
        Ok(Endpoint {
            shared,
            endpoint: Mutex::new(Some(endpoint)),
            socket: Mutex::new(Some(socket)),
            sockets,
            held,
            wake: Mutex::new(Some(wake)),
            client_crypto,
            transport,
            options,
            early_data,
            admission,
            server_tls,
        })
    }

    /// (server) Present `cert_chain_pem` / `key_pem` and require client certificates that
    /// chain to `trust_pem` from the next handshake on; connections already made carry on.
    ///
    /// Session tickets issued before stay valid while the trust bundle is the same; a new
    /// trust bundle starts a new ticket store (a ticket records a client verified under the
    /// old roots).
    fn set_identity(
        &self,
        cert_chain_pem: &[u8],
        key_pem: &[u8],
        trust_pem: &[u8],
    ) -> PyResult<()> {
        let Some(tls) = self.server_tls.as_ref() else {
            return Err(config_error(
                "set_identity: a client endpoint keeps its identity (bind a new one)",
            ));
        };
        let chain = pem_certificates(cert_chain_pem, "certificate chain")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| config_error(format!("private key: not a PEM private key: {e}")))?;
        let roots = trust_roots(trust_pem)?;
        let config = tls.build(chain, key, &roots, trust_pem)?;
        let mut current = lock(&tls.current);
        self.quinn()?.set_server_config(Some(config.clone()));
        *current = Some(config);
        Ok(())
    }

    /// (server) Connections accepted whose handshake has not completed (0 for a client).
    fn half_open(&self) -> usize {
        self.admission.as_ref().map_or(0, |a| a.half_open())
    }

    /// The file descriptor that turns readable when events are waiting (for `add_reader`);
    /// -1 once the endpoint is closed.
    fn fileno(&self) -> i32 {
        lock(&self.wake)
            .as_ref()
            .map_or(-1, |wake| wake.as_raw_fd())
    }

    /// Take every waiting event, as tuples whose first item names the event.
    fn drain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        if let Some(wake) = lock(&self.wake).as_ref() {
            let mut sink = [0u8; 256];
            while matches!((&*wake).read(&mut sink), Ok(n) if n > 0) {}
        }
        let events = self.shared.take_events();
        let items = events
            .into_iter()
            .map(|event| event_tuple(py, event))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, items)
    }

    /// The local `(host, port)` the socket is bound to.
    fn local_address(&self) -> PyResult<(String, u16)> {
        let address = self
            .quinn()?
            .local_addr()
            .map_err(|e| quicmesh_error("QuicmeshError", e.to_string()))?;
        Ok((address.ip().to_string(), address.port()))
    }

    /// Start connecting to `host:port`; returns a token that a `connected` or
    /// `connect_failed` event carries. With `allowed`, only those server SPIFFE IDs are accepted.
    /// With `resume=False` the connection does a full handshake (the server's certificate is
    /// verified again) even where a ticket would resume it; the tickets it gets are kept.
    #[pyo3(signature = (host, port, *, server_name=None, allowed=None, resume=true))]
    fn connect(
        &self,
        host: &str,
        port: u16,
        server_name: Option<&str>,
        allowed: Option<Vec<String>>,
        resume: bool,
    ) -> PyResult<u64> {
        let address = engine::socket_addr(host, port).map_err(config_error)?;
        // Session tickets are stored per server name: by default the server's address.
        let server_name = server_name.unwrap_or(host);
        let crypto = (self.client_crypto)(allowed, resume).map_err(config_error)?;
        // quinn starts the connection's driver task here: it needs the runtime's context.
        let rt = runtime().map_err(|e| quicmesh_error("QuicmeshError", e))?;
        let _entered = rt.enter();
        let token = self.shared.next_id();
        let transport = if self.options.qlog_dir.is_some() {
            self.options
                .build_for_connection("client", token)
                .map_err(config_error)?
        } else {
            Arc::clone(&self.transport)
        };
        let mut config = quinn::ClientConfig::new(crypto);
        config.transport_config(transport);
        let endpoint = self.quinn()?;
        // Registered before the first flight leaves: an ICMP error may come back at once.
        lock(&self.shared.connecting).insert(token, (address, None));
        // A 0-RTT connection's first flight waits for Python's requests ([`hold`]).
        let hold = self.early_data.then(|| self.held.hold(address));
        let connecting = endpoint
            .connect_with(config, address, server_name)
            .map_err(|e| {
                lock(&self.shared.connecting).remove(&token);
                if let Some(hold) = hold {
                    self.held.release(address, hold);
                }
                quicmesh_error("ConnectError", format!("cannot connect to {address}: {e}"))
            })?;
        let shared = Arc::clone(&self.shared);
        let connecting = if self.early_data {
            match connecting.into_0rtt() {
                Ok((conn, accepted)) => {
                    lock(&shared.connecting).remove(&token);
                    shared.adopt_early_client(token, conn, accepted);
                    if let Some(hold) = hold {
                        let held = Arc::clone(&self.held);
                        rt.spawn(async move {
                            tokio::time::sleep(hold::HOLD_AT_MOST).await;
                            held.release(address, hold);
                        });
                    }
                    return Ok(token);
                }
                Err(connecting) => {
                    // A full handshake: nothing can go before it, nothing to wait for.
                    if let Some(hold) = hold {
                        self.held.release(address, hold);
                    }
                    connecting
                }
            }
        } else {
            connecting
        };
        let mut handshakes = lock(&self.shared.connecting);
        let task = rt.spawn(async move {
            match connecting.await {
                Ok(conn) => match engine::confirmed(&conn).await {
                    Ok(()) => {
                        let id = shared.adopt(conn);
                        shared.push(Event::Connected {
                            token,
                            conn: id,
                            early: false,
                        });
                    }
                    Err(error) => {
                        let (kind, message) = engine::classify(&error);
                        shared.push(Event::ConnectFailed {
                            token,
                            kind,
                            message,
                        });
                    }
                },
                Err(error) => {
                    let (kind, message) = engine::classify(&error);
                    shared.push(Event::ConnectFailed {
                        token,
                        kind,
                        message,
                    });
                }
            }
            lock(&shared.connecting).remove(&token);
        });
        // Before the task can remove the entry: it waits for this lock.
        handshakes.insert(token, (address, Some(task.abort_handle())));
        Ok(token)
    }

    /// Give up a connect still in its handshake (no event follows): quinn closes the
    /// connection. False if it is no longer in its handshake (its event is on its way).
    fn abort_connect(&self, token: u64) -> bool {
        match lock(&self.shared.connecting).remove(&token) {
            Some((_, task)) => {
                if let Some(task) = task {
                    task.abort();
                }
                true
            }
            None => false,
        }
    }

    /// Open a stream (waiting for the peer's stream limit); returns a token that a
    /// `stream_opened` or `open_failed` event carries.
    #[pyo3(signature = (conn, *, bidirectional=true))]
    fn open_stream(&self, conn: u64, bidirectional: bool) -> PyResult<u64> {
        let connection = self.connection(conn)?;
        let token = self.shared.next_id();
        let shared = Arc::clone(&self.shared);
        runtime().map_err(|e| quicmesh_error("QuicmeshError", e))?;
        let opening = async move {
            let opened = if bidirectional {
                connection
                    .open_bi()
                    .await
                    .map(|(send, recv)| (send, Some(recv)))
            } else {
                connection.open_uni().await.map(|send| (send, None))
            };
            match opened {
                Ok((send, recv)) => {
                    let stream = u64::from(send.id());
                    shared.start_stream(conn, stream, Some(send), recv, None, false);
                    shared.push(Event::StreamOpened {
                        token,
                        conn,
                        stream,
                    });
                }
                Err(error) => {
                    shared.push(Event::OpenFailed {
                        token,
                        conn,
                        message: error.to_string(),
                    });
                }
            }
        };
        self.shared.command(move || drop(tokio::spawn(opening)));
        Ok(token)
    }

    /// Open a stream now if the peer's stream limit allows it; return its ID, or `None` when
    /// the limit is reached (then `open_stream` waits for it). `first_read`: (bidirectional)
    /// read the stream's first chunk of at most that many bytes without a read request,
    /// as for a stream the peer opened (`set_first_read`): the answer to what is sent on
    /// the stream is asked for in the same call that opens it.
    #[pyo3(signature = (conn, *, bidirectional=true, first_read=None))]
    fn try_open_stream(
        &self,
        conn: u64,
        bidirectional: bool,
        first_read: Option<usize>,
    ) -> PyResult<Option<u64>> {
        let connection = self.connection(conn)?;
        // Held until the stream is registered: a rejection of the connection's 0-RTT is
        // either settled before (the stream is a 1-RTT one, recorded as kept) or sees it.
        let mut early = lock(&self.shared.early);
        let rt = runtime().map_err(|e| quicmesh_error("QuicmeshError", e))?;
        let _entered = rt.enter();
        let mut context = Context::from_waker(Waker::noop());
        let opened = if bidirectional {
            let mut opening = pin!(connection.open_bi());
            match opening.as_mut().poll(&mut context) {
                Poll::Ready(result) => result.map(|(send, recv)| (send, Some(recv))),
                Poll::Pending => return Ok(None),
            }
        } else {
            let mut opening = pin!(connection.open_uni());
            match opening.as_mut().poll(&mut context) {
                Poll::Ready(result) => result.map(|send| (send, None)),
                Poll::Pending => return Ok(None),
            }
        };
        let (send, recv) = opened.map_err(|e| quicmesh_error("ConnectionLost", e.to_string()))?;
        let stream = u64::from(send.id());
        let first_read = first_read.filter(|_| recv.is_some());
        self.shared
            .start_stream(conn, stream, Some(send), recv, first_read, true);
        if let Some(state) = early.get_mut(&conn).filter(|state| state.settled) {
            state.kept.push(stream);
        }
        Ok(Some(stream))
    }

    /// (client, 0-RTT rejected) The streams quinn opened after it took the rejection (1-RTT
    /// ones, not lost with the flight); asked once, when Python takes the `early_data` event.
    fn early_kept(&self, conn: u64) -> Vec<u64> {
        lock(&self.shared.early)
            .remove(&conn)
            .map(|state| state.kept)
            .unwrap_or_default()
    }

    /// Queue `data` on a stream; `written` events report what quinn took (within the peer's
    /// credit): the caller bounds what it has outstanding.
    fn write(&self, conn: u64, stream: u64, data: &[u8]) -> PyResult<()> {
        self.send_command(conn, stream, SendCmd::Write(Bytes::copy_from_slice(data)))
    }

    /// Finish the stream's sending side (FIN after the queued data).
    fn finish(&self, conn: u64, stream: u64) -> PyResult<()> {
        self.send_command(conn, stream, SendCmd::Finish)
    }

    /// Abort the sending side with RESET_STREAM(`code`); returns whether it was still open.
    fn reset(&self, conn: u64, stream: u64, code: u64) -> PyResult<bool> {
        let code = varint("error code", code)?;
        // A receiving half handed over for a splice that never started: stop it with the
        // reset's code once its task gives it (dropped, quinn would send STOP_SENDING 0,
        // not an HTTP/3 code).
        if let Some(handed) = lock(&self.shared.read_handovers).remove(&(conn, stream)) {
            self.shared
                .command(move || splice::stop_handed_over(Some(handed), code));
        }
        Ok(self
            .send_command(conn, stream, SendCmd::Reset(code))
            .is_ok())
    }

    /// Ask for up to `max_bytes` of the stream; a `data` event answers. Only these requests
    /// take data out of quinn, so only they open the peer's credit.
    fn read(&self, conn: u64, stream: u64, max_bytes: usize) -> PyResult<()> {
        self.recv_command(conn, stream, RecvCmd::Read(max_bytes))
    }

    /// Take what quinn holds of the stream now, up to `max_bytes`, without waiting: a
    /// `ready` event answers (maybe empty; with the FIN if it came), and a pending `read`
    /// stays pending. (Before the session aborts a stream on the peer's STOP_SENDING:
    /// stopping the receiving half makes quinn drop what it holds, a complete answer too.)
    fn take_ready(&self, conn: u64, stream: u64, max_bytes: usize) -> PyResult<()> {
        self.recv_command(conn, stream, RecvCmd::TakeReady(max_bytes))
    }

    /// (server) Give connection `conn` `count` more permits to read a new request stream of
    /// the peer's at once (the endpoint's first read); once given any, a stream without one
    /// is left unread until Python asks (`read`), so Python's new-stream rate can hold it in
    /// its slot. See `engine::Shared::grant_read_permits`.
    fn grant_read_permits(&self, conn: u64, count: usize) {
        self.shared.grant_read_permits(conn, count);
    }

    /// (server) Take back the read permits connection `conn` has left; returns how many.
    fn revoke_read_permits(&self, conn: u64) -> usize {
        self.shared.revoke_read_permits(conn)
    }

    /// Abort the receiving side with STOP_SENDING(`code`); returns whether it was still open.
    fn stop_sending(&self, conn: u64, stream: u64, code: u64) -> PyResult<bool> {
        let code = varint("error code", code)?;
        Ok(self
            .recv_command(conn, stream, RecvCmd::StopSending(code))
            .is_ok())
    }

    /// (splicing) Stop reading a stream; a `read_paused` event follows every `data` event
    /// already given for it (at once if its receiving side is already over).
    fn pause_read(&self, conn: u64, stream: u64) {
        if self.recv_command(conn, stream, RecvCmd::Pause).is_err() {
            self.shared.push(Event::ReadPaused { conn, stream });
        }
    }

    /// (splicing) Hand the stream's receiving half to the splice Python starts next, at
    /// once: no `pause_read` round trip. The splice adds the bytes the half gave that Python
    /// had not seen (`splice`'s `received`: see `engine::ReadLog`). False when the half is
    /// already gone (its task ended): then pause it as before.
    fn hand_over_read(&self, conn: u64, stream: u64) -> bool {
        let (to, from) = tokio::sync::oneshot::channel();
        if self
            .recv_command(conn, stream, RecvCmd::Handover(to))
            .is_err()
        {
            return false;
        }
        lock(&self.shared.read_handovers).insert((conn, stream), from);
        true
    }

    /// (splicing) Splice a stream onto the TCP socket just sent to `fd_carrier()` with
    /// `token`: the engine copies both ways until both end, then a `spliced` event reports
    /// the bytes each way and the failure, if any (see `splice.rs`). `to_tcp`: payload
    /// received and not yet written to the socket; `to_quic`: bytes read from the socket and
    /// not yet sent; `unparsed`, `frame_type`, `frame_remaining`: the HTTP/3 parser's state;
    /// `recv_fin`: the stream's FIN was received. Returns the splice's ID.
    /// With `engine_socket`, `token` is a socket this engine connected (`tcp_connect`)
    /// instead. `received`: the stream bytes Python saw, when its receiving half was handed
    /// over with `hand_over_read` (the rest of what the half gave goes to the deframer).
    /// `idle_timeout`: seconds with no byte moving either way after which the flow is reset
    /// both ways (Envoy's `tcp_proxy` `idle_timeout`; None: never).
    #[pyo3(signature = (
        conn, stream, token, *, to_tcp, to_quic, unparsed, frame_type=None, frame_remaining=0,
        recv_fin=false, engine_socket=false, received=None, idle_timeout=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn splice(
        &self,
        conn: u64,
        stream: u64,
        token: u64,
        to_tcp: &[u8],
        to_quic: &[u8],
        unparsed: &[u8],
        frame_type: Option<u64>,
        frame_remaining: u64,
        recv_fin: bool,
        engine_socket: bool,
        received: Option<u64>,
        idle_timeout: Option<f64>,
    ) -> PyResult<u64> {
        let idle_timeout = seconds(idle_timeout, "idle_timeout")?;
        let deframer = splice::Deframer::resume(frame_type, frame_remaining)
            .map_err(|e| quicmesh_error("TunnelError", e.message))?;
        let connection = self.connection(conn)?;
        let rt = runtime().map_err(|e| quicmesh_error("QuicmeshError", e))?;
        let _entered = rt.enter();
        let tcp = if engine_socket {
            match lock(&self.shared.tcp).remove(&token) {
                Some(TcpSlot::Connected(tcp)) => tcp,
                Some(TcpSlot::Starting) => {
                    return Err(quicmesh_error(
                        "QuicmeshError",
                        format!("the engine's TCP connection {token} is not connected yet"),
                    ));
                }
                Some(TcpSlot::Connecting(task)) => {
                    task.abort();
                    return Err(quicmesh_error(
                        "QuicmeshError",
                        format!("the engine's TCP connection {token} is not connected yet"),
                    ));
                }
                None => {
                    return Err(quicmesh_error(
                        "QuicmeshError",
                        format!("the engine holds no TCP connection {token}"),
                    ))
                }
            }
        } else {
            let inbox = splice::FdInbox::get().map_err(|e| quicmesh_error("QuicmeshError", e))?;
            let fd = inbox
                .take(token)
                .map_err(|e| quicmesh_error("QuicmeshError", e))?;
            let tcp = std::net::TcpStream::from(fd);
            tcp.set_nonblocking(true)
                .map_err(|e| quicmesh_error("QuicmeshError", e.to_string()))?;
            tokio::net::TcpStream::from_std(tcp)
                .map_err(|e| quicmesh_error("QuicmeshError", e.to_string()))?
        };
        let (send_to, send_from) = tokio::sync::oneshot::channel();
        let send = self
            .send_command(conn, stream, SendCmd::Handover(send_to))
            .ok()
            .map(|()| send_from);
        let recv = self.take_reading(conn, stream, recv_fin);
        let (spec, held, abort_from) = self.register_splice(
            conn,
            stream,
            to_tcp,
            to_quic,
            unparsed,
            deframer,
            recv_fin,
            received,
            idle_timeout,
        );
        let id = spec.id;
        let splicing = splice::run(
            Arc::clone(&self.shared),
            spec,
            held,
            tcp,
            connection,
            send,
            recv,
            abort_from,
        );
        // After the hand-over commands above (and every write before them).
        self.shared.command(move || drop(tokio::spawn(splicing)));
        Ok(id)
    }

    /// (splicing, the accepting side) Connect `host:port` (an IP address) within `timeout`
    /// seconds, then answer the stream's CONNECT with `answer` (its HEADERS frame) and splice
    /// the stream onto the connection, in one command: `splice`'s arguments are as there (the
    /// stream's state when Python let it go). A `spliced` event ends it; if the connect
    /// fails, a `splice_unconnected` event says why instead, nothing was sent on the stream
    /// and Python answers it (its receiving half is stopped). Returns the splice's ID
    /// (`splice_abort` works from the start). `idle_timeout` as `splice`'s.
    #[pyo3(signature = (
        conn, stream, host, port, *, timeout, answer, to_tcp, unparsed, frame_type=None,
        frame_remaining=0, recv_fin=false, received=None, idle_timeout=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn connect_splice(
        &self,
        conn: u64,
        stream: u64,
        host: &str,
        port: u16,
        timeout: f64,
        answer: &[u8],
        to_tcp: &[u8],
        unparsed: &[u8],
        frame_type: Option<u64>,
        frame_remaining: u64,
        recv_fin: bool,
        received: Option<u64>,
        idle_timeout: Option<f64>,
    ) -> PyResult<u64> {
        // Taken first: a receiving half handed over (`hand_over_read`) is stopped if the
        // command fails, not left parked until the connection ends.
        let recv = self.take_reading(conn, stream, recv_fin);
        let prepared = (|| {
            let address = engine::socket_addr(host, port).map_err(config_error)?;
            let timeout = seconds(Some(timeout), "connect_timeout")?.unwrap_or_default();
            let idle_timeout = seconds(idle_timeout, "idle_timeout")?;
            let deframer = splice::Deframer::resume(frame_type, frame_remaining)
                .map_err(|e| quicmesh_error("TunnelError", e.message))?;
            let connection = self.connection(conn)?;
            // The splice's task needs the engine's runtime (its command spawns it there).
            runtime().map_err(|e| quicmesh_error("QuicmeshError", e))?;
            let socket = tcp_socket(address)?;
            Ok((address, timeout, idle_timeout, deframer, connection, socket))
        })();
        let (address, timeout, idle_timeout, deframer, connection, socket) = match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                splice::stop_handed_over(recv, VarInt::from_u32(splice::H3_NO_ERROR as u32));
                return Err(error);
            }
        };
        let (spec, held, abort_from) = self.register_splice(
            conn,
            stream,
            to_tcp,
            b"",
            unparsed,
            deframer,
            recv_fin,
            received,
            idle_timeout,
        );
        let id = spec.id;
        let destination = splice::Destination {
            socket,
            address,
            timeout,
            answer: Bytes::copy_from_slice(answer),
        };
        let splicing = splice::connect_and_run(
            Arc::clone(&self.shared),
            spec,
            held,
            destination,
            connection,
            recv,
            abort_from,
        );
        // After the hand-over commands before it (as `splice`).
        self.shared.command(move || drop(tokio::spawn(splicing)));
        Ok(id)
    }

    /// (outbound flows) Start the connection `acceptor` accepted as `flow` on connection
    /// `conn`: the engine opens a stream, sends `request` (the CONNECT's HEADERS frame) and,
    /// once the stream's first bytes are `answer` (the HEADERS frame of the 200 expected),
    /// splices the connection onto it; a `spliced` event (the flow's ID as the splice's) ends
    /// it, or a `flow_unanswered` event gives it back parked (`outbound.rs`). False, with
    /// the connection parked again, when the peer's stream limit allows no stream now.
    /// `idle_timeout` as `splice`'s.
    #[pyo3(signature = (acceptor, flow, conn, *, request, answer, timeout, idle_timeout=None))]
    #[allow(clippy::too_many_arguments)]
    fn start_flow(
        &self,
        acceptor: &FlowAcceptor,
        flow: u64,
        conn: u64,
        request: &[u8],
        answer: &[u8],
        timeout: f64,
        idle_timeout: Option<f64>,
    ) -> PyResult<bool> {
        let connection = self.connection(conn)?;
        let timeout = seconds(Some(timeout), "timeout")?.unwrap_or_default();
        let idle_timeout = seconds(idle_timeout, "idle_timeout")?;
        let acceptor = &acceptor.inner;
        let Some(tcp) = acceptor.take(flow) else {
            return Err(quicmesh_error(
                "QuicmeshError",
                format!("no accepted connection {flow} is waiting"),
            ));
        };
        let rt = runtime().map_err(|e| quicmesh_error("QuicmeshError", e))?;
        let _entered = rt.enter();
        let mut context = Context::from_waker(Waker::noop());
        let opened = {
            let mut opening = pin!(connection.open_bi());
            opening.as_mut().poll(&mut context)
        };
        let (send, recv) = match opened {
            Poll::Ready(Ok(halves)) => halves,
            Poll::Pending => {
                acceptor.park(flow, tcp);
                return Ok(false);
            }
            Poll::Ready(Err(error)) => {
                acceptor.park(flow, tcp);
                return Err(quicmesh_error("ConnectionLost", error.to_string()));
            }
        };
        let shared = Arc::clone(&acceptor.shared);
        let (held, abort) = outbound::register(&shared, flow, idle_timeout);
        let start = outbound::FlowStart {
            flow,
            conn,
            send,
            recv,
            tcp,
            connection,
            request: Bytes::copy_from_slice(request),
            answer: Bytes::copy_from_slice(answer),
            timeout,
        };
        self.shared
            .command(move || drop(tokio::spawn(outbound::run(shared, start, held, abort))));
        Ok(true)
    }

    /// (splicing) Connect a TCP socket to `host:port` (an IP address) for a splice, within
    /// `timeout` seconds; returns a token that a `tcp_connected` event carries with errno 0
    /// (connected: pass the token to `splice` with `engine_socket=True`) or why it failed
    /// (`ETIMEDOUT` when the timeout passed). The engine's thread connects: no descriptor
    /// crosses to Python and back.
    #[pyo3(signature = (host, port, *, timeout))]
    fn tcp_connect(&self, host: &str, port: u16, timeout: f64) -> PyResult<u64> {
        self.quinn()?; // closed: no new socket (one made then was held until the object went)
        let address = engine::socket_addr(host, port).map_err(config_error)?;
        let timeout = seconds(Some(timeout), "connect_timeout")?.unwrap_or_default();
        runtime().map_err(|e| quicmesh_error("QuicmeshError", e))?;
        let socket = tcp_socket(address)?;
        let token = self.shared.next_id();
        let shared = Arc::clone(&self.shared);
        let connecting = async move {
            let connect = socket.connect(address);
            let outcome = match tokio::time::timeout(timeout, connect).await {
                Ok(Ok(tcp)) => {
                    // As asyncio's transports: no Nagle delay on the proxied flow.
                    let _ = tcp.set_nodelay(true);
                    Ok(tcp)
                }
                Ok(Err(error)) => Err((
                    error
                        .raw_os_error()
                        .unwrap_or(rustix::io::Errno::IO.raw_os_error()),
                    error.to_string(),
                )),
                Err(_) => Err((
                    rustix::io::Errno::TIMEDOUT.raw_os_error(),
                    "timed out".to_owned(),
                )),
            };
            let mut slots = lock(&shared.tcp);
            if !slots.contains_key(&token) {
                return; // given up meanwhile (`tcp_abort`)
            }
            let event = match outcome {
                Ok(tcp) => {
                    slots.insert(token, TcpSlot::Connected(tcp));
                    Event::TcpConnected {
                        token,
                        errno: 0,
                        message: String::new(),
                    }
                }
                Err((errno, message)) => {
                    slots.remove(&token);
                    Event::TcpConnected {
                        token,
                        errno,
                        message,
                    }
                }
            };
            drop(slots);
            shared.push(event);
        };
        lock(&self.shared.tcp).insert(token, TcpSlot::Starting);
        let shared = Arc::clone(&self.shared);
        self.shared.command(move || {
            let mut slots = lock(&shared.tcp);
            // Not if `tcp_abort` gave it up first; the task waits for this lock to look.
            if let Some(slot @ TcpSlot::Starting) = slots.get_mut(&token) {
                *slot = TcpSlot::Connecting(tokio::spawn(connecting).abort_handle());
            }
        });
        Ok(token)
    }

    /// (splicing) Give up a `tcp_connect`: a connect under way stops (no event follows), a
    /// connected socket is closed with RST. Returns whether the token was still held.
    fn tcp_abort(&self, token: u64) -> bool {
        let slot = lock(&self.shared.tcp).remove(&token);
        let _entered = runtime().ok().map(|rt| rt.enter());
        match slot {
            Some(TcpSlot::Connecting(task)) => {
                task.abort();
                true
            }
            Some(TcpSlot::Starting) => true,
            Some(TcpSlot::Connected(tcp)) => {
                let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                true
            }
            None => false,
        }
    }

    /// (splicing) Take a connected `tcp_connect` socket back: its descriptor, now Python's
    /// (non-blocking), or `None` if the engine holds no connected socket for `token`.
    fn tcp_release(&self, token: u64) -> PyResult<Option<i32>> {
        let mut slots = lock(&self.shared.tcp);
        if !matches!(slots.get(&token), Some(TcpSlot::Connected(_))) {
            return Ok(None);
        }
        let Some(TcpSlot::Connected(tcp)) = slots.remove(&token) else {
            return Ok(None);
        };
        drop(slots);
        let _entered = runtime().ok().map(|rt| rt.enter());
        let tcp = tcp
            .into_std()
            .map_err(|e| quicmesh_error("QuicmeshError", e.to_string()))?;
        Ok(Some(std::os::fd::IntoRawFd::into_raw_fd(tcp)))
    }

    /// (splicing) Fail a spliced flow: both sides are reset (the stream with `code`), and
    /// its `spliced` event follows. Returns whether it was still running.
    fn splice_abort(&self, id: u64, code: u64) -> bool {
        self.shared.abort_splice(id, code)
    }

    /// (splicing) The bytes a spliced flow holds now: read from the TCP socket and not yet
    /// taken by quinn (beyond the QUIC peer's credit), and received from quinn and not yet
    /// written to the socket; 0 once it ended. What a flow would hold in Python's buffers.
    fn splice_buffered(&self, id: u64) -> u64 {
        lock(&self.shared.splices)
            .get(&id)
            .map_or(0, |handle| handle.held.total())
    }

    /// (splicing) The payload a spliced flow (or an engine flow) moved so far, (read from
    /// TCP for the stream, written to TCP), as its `spliced` event will report them; None
    /// once it ended (its event carries the totals).
    fn splice_moved(&self, id: u64) -> Option<(u64, u64)> {
        self.shared.splice_moved(id)
    }

    /// From now on, hold this endpoint's commands (writes, reads, resets, splices, stream
    /// tasks, TCP connects, closes) until `flush`, which wakes the engine's thread once for
    /// all of them; an event loop flushes once per turn. Without it each command wakes the
    /// engine's thread itself.
    fn defer_commands(&self) -> PyResult<()> {
        self.shared
            .defer_commands()
            .map_err(|e| quicmesh_error("QuicmeshError", e))
    }

    /// Run the commands held since the last flush (`defer_commands`), in order.
    fn flush(&self) {
        self.shared.flush();
    }

    /// (client) Send the first flights held for Python's requests ([`hold`]) once the
    /// commands given before this one have run: Python gives it after the requests of the
    /// turn that made a 0-RTT connection.
    fn release_held(&self) {
        let held = Arc::clone(&self.held);
        self.shared.command(move || held.release_all());
    }

    /// Close a connection with application error `code` and `reason`.
    #[pyo3(signature = (conn, code=0, reason=""))]
    fn close_connection(&self, conn: u64, code: u64, reason: &str) -> PyResult<()> {
        let code = varint("error code", code)?;
        if let Some(connection) = lock(&self.shared.connections).get(&conn).cloned() {
            // After the commands before it: data written before the close goes out first.
            let reason = Bytes::copy_from_slice(reason.as_bytes());
            self.shared.command(move || connection.close(code, &reason));
        }
        Ok(())
    }

    /// The peer's certificate chain, DER, leaf first.
    fn peer_certificates<'py>(&self, py: Python<'py>, conn: u64) -> PyResult<Bound<'py, PyList>> {
        let connection = self.connection(conn)?;
        let chain = connection
            .peer_identity()
            .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
            .map(|chain| *chain)
            .unwrap_or_default();
        PyList::new(py, chain.iter().map(|der| PyBytes::new(py, der.as_ref())))
    }

    /// The peer's `(host, port)`.
    fn remote_address(&self, conn: u64) -> PyResult<(String, u16)> {
        let address = self.connection(conn)?.remote_address();
        Ok((address.ip().to_string(), address.port()))
    }

    /// The largest DATAGRAM the peer takes now, or `None` when it announced no
    /// max_datagram_frame_size (RFC 9221): HTTP/3 refuses SETTINGS_H3_DATAGRAM without it.
    fn peer_max_datagram_size(&self, conn: u64) -> PyResult<Option<usize>> {
        Ok(self.connection(conn)?.max_datagram_size())
    }

    /// The connection's path and UDP counters: rtt and min_rtt in seconds, cwnd in bytes, ...;
    /// `handshake_done_frames`: HANDSHAKE_DONE frames received (a client's handshake confirmed).
    fn stats<'py>(&self, py: Python<'py>, conn: u64) -> PyResult<Bound<'py, PyDict>> {
        let stats = self.connection(conn)?.stats();
        let dict = PyDict::new(py);
        dict.set_item("rtt", stats.path.rtt.as_secs_f64())?;
        dict.set_item("min_rtt", stats.path.min_rtt.as_secs_f64())?;
        dict.set_item("cwnd", stats.path.cwnd)?;
        dict.set_item("lost_packets", stats.path.lost_packets)?;
        dict.set_item("lost_bytes", stats.path.lost_bytes)?;
        dict.set_item("sent_packets", stats.path.sent_packets)?;
        dict.set_item("congestion_events", stats.path.congestion_events)?;
        dict.set_item("mtu", stats.path.current_mtu)?;
        dict.set_item("datagrams_sent", stats.udp_tx.datagrams)?;
        dict.set_item("bytes_sent", stats.udp_tx.bytes)?;
        dict.set_item("send_calls", stats.udp_tx.ios)?;
        dict.set_item("datagrams_received", stats.udp_rx.datagrams)?;
        dict.set_item("receive_calls", stats.udp_rx.ios)?;
        dict.set_item("bytes_received", stats.udp_rx.bytes)?;
        dict.set_item("mtu_probes_sent", stats.path.sent_plpmtud_probes)?;
        dict.set_item("handshake_done_frames", stats.frame_rx.handshake_done)?;
        dict.set_item("acks_sent", stats.frame_tx.acks)?;
        dict.set_item("acks_received", stats.frame_rx.acks)?;
        dict.set_item("ack_frequency_sent", stats.frame_tx.ack_frequency)?;
        dict.set_item("ack_frequency_received", stats.frame_rx.ack_frequency)?;
        dict.set_item("max_streams_bidi_sent", stats.frame_tx.max_streams_bidi)?;
        dict.set_item("max_streams_bidi_received", stats.frame_rx.max_streams_bidi)?;
        dict.set_item(
            "streams_blocked_bidi_sent",
            stats.frame_tx.streams_blocked_bidi,
        )?;
        dict.set_item(
            "streams_blocked_bidi_received",
            stats.frame_rx.streams_blocked_bidi,
        )?;
        dict.set_item(
            "ack_eliciting_frames_sent",
            engine::ack_eliciting(&stats.frame_tx),
        )?;
        Ok(dict)
    }

    /// Move to a new UDP socket bound on `host:port` (port 0: any); every connection follows
    /// (quinn sends a PING there at once; the peer validates the new path, RFC 9000 section 9).
    /// The old socket is still read for `grace` seconds ([`rebind::MigratedSocket`]: what the
    /// peer sent there before it noticed the move). Returns the new local address.
    #[pyo3(signature = (host, port, grace=2.0))]
    fn rebind(&self, host: &str, port: u16, grace: f64) -> PyResult<(String, u16)> {
        let grace = Duration::try_from_secs_f64(grace)
            .map_err(|_| config_error(format!("grace must be seconds >= 0, not {grace}")))?;
        let address = engine::socket_addr(host, port).map_err(config_error)?;
        let socket = engine::bind_udp(address)
            .map_err(|e| config_error(format!("cannot bind UDP {address}: {e}")))?;
        let rt = runtime().map_err(|e| quicmesh_error("QuicmeshError", e))?;
        let _entered = rt.enter();
        let socket = icmp::ErrorQueueSocket::wrap(
            socket,
            icmp_sink(&self.shared),
            self.sockets.hold(),
            Arc::clone(&self.held),
        )
        .map_err(|e| config_error(format!("cannot bind UDP {address}: {e}")))?;
        let mut current = lock(&self.socket);
        let Some(old) = current.as_ref() else {
            return Err(quicmesh_error("ConnectError", "the endpoint is closed"));
        };
        let socket = rebind::MigratedSocket::wrap(socket, Arc::clone(old), grace);
        self.quinn()?
            .rebind_abstract(Arc::clone(&socket))
            .map_err(|e| {
                quicmesh_error("ConnectError", format!("cannot move to {address}: {e}"))
            })?;
        *current = Some(socket);
        drop(current);
        self.local_address()
    }

    /// Make quinn send an ack-eliciting packet on the connection now (quicmesh's probe after an
    /// ICMP unreachable: the next error, or the peer's answer, comes a round trip later).
    ///
    /// quinn 0.11 has no PING command (quinn-proto's `Connection::ping` is not exposed): the
    /// connection's receive window is lowered by one byte and raised back, which queues a
    /// MAX_DATA frame at once and leaves the credit as it was (quinn repays the byte it shrank
    /// out of later credit).
    fn ping(&self, conn: u64) -> PyResult<()> {
        let connection = self.connection(conn)?;
        let window = match self.options.receive_window {
            Some(window) => varint("receive_window", window)?,
            None => VarInt::MAX, // quinn's default
        };
        let lower = VarInt::from_u64(window.into_inner().saturating_sub(1)).unwrap_or(window);
        connection.set_receive_window(lower);
        connection.set_receive_window(window);
        Ok(())
    }

    /// Close every connection and stop accepting.
    #[pyo3(signature = (code=0, reason=""))]
    fn close(&self, code: u64, reason: &str) -> PyResult<()> {
        let code = varint("error code", code)?;
        self.shared.run_commands_now();
        self.let_go(code, reason.as_bytes());
        Ok(())
    }

    /// (after `close`) Wait, without the GIL, until every UDP socket the endpoint bound is
    /// closed (its connections drained, [`release`]), at most `timeout` seconds: whether they
    /// are, so the port can be bound again.
    fn wait_released(&self, py: Python<'_>, timeout: f64) -> PyResult<bool> {
        let timeout = Duration::try_from_secs_f64(timeout)
            .map_err(|_| config_error(format!("timeout must be seconds >= 0, not {timeout}")))?;
        let sockets = Arc::clone(&self.sockets);
        Ok(py.allow_threads(move || sockets.wait_closed(timeout)))
    }
}

impl Endpoint {
    /// quinn's endpoint, while open.
    fn quinn(&self) -> PyResult<quinn::Endpoint> {
        lock(&self.endpoint)
            .clone()
            .ok_or_else(|| quicmesh_error("ConnectError", "the endpoint is closed"))
    }

    /// Close every connection and let go of quinn's endpoint and its socket: once the
    /// connections have drained, quinn's driver ends and the UDP port is free again.
    fn let_go(&self, code: VarInt, reason: &[u8]) {
        if let Some(endpoint) = lock(&self.endpoint).take() {
            endpoint.close(code, reason);
        }
        lock(&self.socket).take();
        // The wake-up pair too (Python stopped watching it first): a closed endpoint, kept
        // by a caller long after, holds no descriptor.
        lock(&self.wake).take();
        self.shared.close_wake();
    }

    fn connection(&self, conn: u64) -> PyResult<quinn::Connection> {
        lock(&self.shared.connections)
            .get(&conn)
            .cloned()
            .ok_or_else(|| quicmesh_error("ConnectionLost", format!("connection {conn} is closed")))
    }

    /// (splicing) The stream's receiving half for a splice: the one `hand_over_read` set
    /// aside, else handed over now (Python paused it first); none once its FIN was read.
    fn take_reading(
        &self,
        conn: u64,
        stream: u64,
        recv_fin: bool,
    ) -> Option<tokio::sync::oneshot::Receiver<RecvHandover>> {
        let handed = lock(&self.shared.read_handovers).remove(&(conn, stream));
        if handed.is_some() || recv_fin {
            return handed;
        }
        let (recv_to, recv_from) = tokio::sync::oneshot::channel();
        self.recv_command(conn, stream, RecvCmd::Handover(recv_to))
            .ok()
            .map(|()| recv_from)
    }

    /// (splicing) Register a new splice (where Python's abort goes, what it holds) and
    /// describe what Python handed over with it.
    #[allow(clippy::too_many_arguments)]
    fn register_splice(
        &self,
        conn: u64,
        stream: u64,
        to_tcp: &[u8],
        to_quic: &[u8],
        unparsed: &[u8],
        deframer: splice::Deframer,
        recv_fin: bool,
        received: Option<u64>,
        idle_timeout: Option<Duration>,
    ) -> (
        splice::SpliceSpec,
        Arc<splice::Held>,
        tokio::sync::oneshot::Receiver<u64>,
    ) {
        let id = self.shared.next_id();
        let (abort_to, abort_from) = tokio::sync::oneshot::channel();
        let held = Arc::new(splice::Held::new(idle_timeout));
        lock(&self.shared.splices).insert(
            id,
            splice::SpliceHandle {
                abort: abort_to,
                held: Arc::clone(&held),
            },
        );
        let spec = splice::SpliceSpec {
            id,
            conn,
            stream,
            to_tcp: Bytes::copy_from_slice(to_tcp),
            to_quic: Bytes::copy_from_slice(to_quic),
            unparsed: Bytes::copy_from_slice(unparsed),
            deframer,
            recv_fin,
            received,
        };
        (spec, held, abort_from)
    }

    /// Give a stream's sending task `command` (as a command: [`engine::Shared::command`]);
    /// an error when the task is gone.
    fn send_command(&self, conn: u64, stream: u64, command: SendCmd) -> PyResult<()> {
        let sender = lock(&self.shared.streams)
            .get(&(conn, stream))
            .and_then(|h| h.send.clone())
            .filter(|sender| !sender.is_closed());
        match sender {
            Some(sender) => {
                self.shared.command(move || drop(sender.send(command)));
                Ok(())
            }
            None => Err(quicmesh_error(
                "StreamReset",
                format!("stream {stream} can no longer send (finished, reset or stopped)"),
            )),
        }
    }

    /// Give a stream's receiving task `command` in the order of Python's commands
    /// ([`engine::Shared::command_recv_in_order`]); an error when the task is gone.
    fn recv_command(&self, conn: u64, stream: u64, command: RecvCmd) -> PyResult<()> {
        if self.shared.command_recv_in_order(conn, stream, command) {
            return Ok(());
        }
        Err(quicmesh_error(
            "StreamReset",
            format!("stream {stream} can no longer be read (finished, reset or stopped)"),
        ))
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.shared.run_commands_now();
        self.shared.close_outbox();
        let _entered = runtime().ok().map(|rt| rt.enter());
        self.let_go(VarInt::from_u32(0), b"");
    }
}

/// Why `value` is not a valid SPIFFE ID (`None` if it is): the rules the native verifier applies.
#[pyfunction]
fn spiffe_id_problem(value: &str) -> Option<&'static str> {
    verify::spiffe_id_problem(value)
}

/// The splice's HTTP/3 deframer (native/src/splice.rs) over `chunks`, fed one by one, then the
/// end of the stream: `(payload, None, "")`, or what was deframed before the first violation,
/// its stream error code and why. Starts at a frame boundary, or inside a frame of
/// `frame_type` with `remaining` bytes to come. For tests of the framing rules.
#[pyfunction]
#[pyo3(signature = (chunks, *, frame_type=None, remaining=0))]
fn h3_deframe<'py>(
    py: Python<'py>,
    chunks: Vec<Vec<u8>>,
    frame_type: Option<u64>,
    remaining: u64,
) -> PyResult<(Bound<'py, PyBytes>, Option<u64>, String)> {
    let mut payload: Vec<Bytes> = Vec::new();
    let result = splice::Deframer::resume(frame_type, remaining).and_then(|mut deframer| {
        for chunk in chunks {
            deframer.feed(Bytes::from(chunk), &mut payload)?;
        }
        deframer.finish()
    });
    let data = PyBytes::new(py, &payload.concat());
    Ok(match result {
        Ok(()) => (data, None, String::new()),
        Err(error) => (data, Some(error.code), error.message),
    })
}

/// (splicing) The descriptor of the Unix datagram socket on which sockets are handed to the
/// engine (SCM_RIGHTS, an 8-byte little-endian token as the payload); duplicate it to use it.
#[pyfunction]
fn fd_carrier() -> PyResult<i32> {
    splice::FdInbox::get()
        .map(splice::FdInbox::sender_fd)
        .map_err(|e| quicmesh_error("QuicmeshError", e))
}

/// The engine's accept loop on a listening TCP socket, for outbound flows the engine runs
/// (`outbound.rs`): `flow_accepted`, `flow_unanswered` and `spliced` events come from it.
#[pyclass(module = "quicmesh._native", frozen)]
struct FlowAcceptor {
    inner: outbound::Acceptor,
}

#[pymethods]
impl FlowAcceptor {
    /// Accept on the listening socket just sent to `fd_carrier()` with `token`.
    #[new]
    fn new(token: u64) -> PyResult<Self> {
        let inbox = splice::FdInbox::get().map_err(|e| quicmesh_error("QuicmeshError", e))?;
        let fd = inbox
            .take(token)
            .map_err(|e| quicmesh_error("QuicmeshError", e))?;
        let inner = outbound::Acceptor::start(std::net::TcpListener::from(fd))
            .map_err(|e| quicmesh_error("QuicmeshError", format!("cannot accept: {e}")))?;
        Ok(FlowAcceptor { inner })
    }

    /// The file descriptor that turns readable when events are waiting (for `add_reader`).
    fn fileno(&self) -> i32 {
        self.inner.wake.as_raw_fd()
    }

    /// Take every waiting event, as tuples whose first item names the event.
    fn drain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let items = self
            .inner
            .take_events()
            .into_iter()
            .map(|event| event_tuple(py, event))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, items)
    }

    /// The local `(host, port)` accepted on.
    fn local_address(&self) -> (String, u16) {
        let address = self.inner.address;
        (address.ip().to_string(), address.port())
    }

    /// Give an accepted connection that is not running to Python: its descriptor (Python
    /// owns it from now on), or None when there is no such connection.
    fn release(&self, flow: u64) -> PyResult<Option<i32>> {
        let Some(tcp) = self.inner.take(flow) else {
            return Ok(None);
        };
        let _entered = runtime().ok().map(|rt| rt.enter());
        let tcp = tcp
            .into_std()
            .map_err(|e| quicmesh_error("QuicmeshError", e.to_string()))?;
        Ok(Some(std::os::fd::IntoRawFd::into_raw_fd(tcp)))
    }

    /// Fail a running engine flow: both sides are reset (the stream with `code`), and its
    /// `spliced` event follows. Returns whether it was still running.
    fn abort(&self, flow: u64, code: u64) -> bool {
        self.inner.shared.abort_splice(flow, code)
    }

    /// The payload a running engine flow moved so far, (read from TCP for the stream,
    /// written to TCP); None once it ended (its `spliced` event carries the totals).
    fn moved(&self, flow: u64) -> Option<(u64, u64)> {
        self.inner.shared.splice_moved(flow)
    }

    /// Stop accepting; flows accepted or running carry on. Once this returns, every
    /// connection the engine accepted has its `flow_accepted` event waiting.
    fn stop(&self, py: Python<'_>) {
        py.allow_threads(|| self.inner.stop());
    }
}

#[pymodule]
#[pyo3(name = "_native")]
fn native_module(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<Endpoint>()?;
    module.add_class::<FlowAcceptor>()?;
    module.add_function(wrap_pyfunction!(spiffe_id_problem, module)?)?;
    module.add_function(wrap_pyfunction!(fd_carrier, module)?)?;
    module.add_function(wrap_pyfunction!(h3_deframe, module)?)?;
    module.add("QUINN_VERSION", "0.11")?;
    // Streams report ("send_acked", conn, stream) once their FIN and data were acknowledged.
    module.add("SEND_ACKED_EVENTS", true)?;
    // `try_open_stream` takes `first_read`.
    module.add("OPEN_WITH_FIRST_READ", true)?;
    Ok(())
}

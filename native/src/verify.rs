//! Peer verification for quicmesh's mTLS: a chain to a root of the trust bundle (rustls-webpki),
//! then the leaf's single URI SAN, read with x509-parser, must be a valid SPIFFE ID in a trust
//! domain that root vouches for (and, optionally, one of the identities the caller allows).
//!
//! The rules mirror `quicmesh/tls/verify.py` (`verify_peer`, `check_trust_domain`) and
//! `quicmesh/tls/spiffe.py` (`validate_spiffe_id`); `tests/native/test_native_spiffe.py`
//! checks with hypothesis that both give the same verdict on the same IDs.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The prefix every SPIFFE ID starts with.
pub const SPIFFE_SCHEME_PREFIX: &str = "spiffe://";
/// The longest SPIFFE ID in bytes the specification allows.
pub const MAX_SPIFFE_ID_BYTES: usize = 2048;

/// Why a peer was refused; its text is what Python's `PeerVerificationError` carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyError(pub String);

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for VerifyError {}

/// Return why `value` is not a valid SPIFFE ID, or `None` if it is (the SPIFFE-ID standard).
pub fn spiffe_id_problem(value: &str) -> Option<&'static str> {
    if value.is_empty() {
        return Some("it is empty");
    }
    if value.len() > MAX_SPIFFE_ID_BYTES {
        return Some("it is longer than 2048 bytes");
    }
    let Some(rest) = value.strip_prefix(SPIFFE_SCHEME_PREFIX) else {
        return Some("it must start with 'spiffe://' (lowercase scheme)");
    };
    if value.contains('?') || value.contains('#') {
        return Some("a query or fragment is not allowed");
    }
    let (trust_domain, path) = match rest.split_once('/') {
        Some((domain, path)) => (domain, Some(path)),
        None => (rest, None),
    };
    if trust_domain.is_empty() {
        return Some("the trust domain is empty");
    }
    if trust_domain.contains('@') {
        return Some("userinfo is not allowed");
    }
    if trust_domain.contains(':') {
        return Some("a port is not allowed");
    }
    let domain_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c);
    if !trust_domain.chars().all(domain_char) {
        return Some(
            "the trust domain may only contain lowercase letters, digits, '.', '-' and '_'",
        );
    }
    let path = path?;
    for segment in path.split('/') {
        if segment.is_empty() {
            return Some("the path has an empty segment (a '//' or a trailing '/')");
        }
        if segment == "." || segment == ".." {
            return Some("the path may not contain '.' or '..' segments");
        }
        let segment_char = |c: char| c.is_ascii_alphanumeric() || ".-_".contains(c);
        if !segment.chars().all(segment_char) {
            return Some("path segments may only contain letters, digits, '.', '-' and '_'");
        }
    }
    None
}

/// Why a valid SPIFFE ID cannot name a leaf (a workload), or `None`: X509-SVID 5.2 wants
/// a path; a trust domain's own ID names its CA (quicmesh/tls/verify.py says it alike).
fn leaf_id_problem(spiffe_id: &str) -> Option<String> {
    let rest = spiffe_id.strip_prefix(SPIFFE_SCHEME_PREFIX)?;
    if rest.contains('/') {
        return None;
    }
    Some(format!(
        "{spiffe_id}, a trust domain's ID with no path, not a workload's"
    ))
}

/// The trust domain of a valid SPIFFE ID.
fn trust_domain_of(spiffe_id: &str) -> &str {
    let rest = spiffe_id
        .strip_prefix(SPIFFE_SCHEME_PREFIX)
        .unwrap_or(spiffe_id);
    rest.split_once('/').map_or(rest, |(domain, _)| domain)
}

/// Every URI subject alternative name of a DER certificate, in order.
pub fn uri_sans_of(der: &[u8]) -> Result<Vec<String>, VerifyError> {
    uri_sans_in(&parse_peer_certificate(der)?)
}

fn parse_peer_certificate(der: &[u8]) -> Result<X509Certificate<'_>, VerifyError> {
    let (_, certificate) = X509Certificate::from_der(der)
        .map_err(|e| VerifyError(format!("peer certificate cannot be parsed: {e}")))?;
    Ok(certificate)
}

/// Why a leaf's key usages are a CA's or cannot sign a handshake (X509-SVID 4.3), or
/// `None`; a leaf that names none is taken (quicmesh/tls/verify.py says it alike).
/// webpki checks a leaf's extended key usage, not these.
fn leaf_key_usage_problem(
    certificate: &X509Certificate<'_>,
) -> Result<Option<String>, VerifyError> {
    let extension = certificate
        .key_usage()
        .map_err(|e| VerifyError(format!("peer certificate has a malformed keyUsage: {e}")))?;
    let Some(usage) = extension.map(|e| e.value) else {
        return Ok(None);
    };
    if usage.key_cert_sign() || usage.crl_sign() {
        let signs = if usage.key_cert_sign() {
            "keyCertSign"
        } else {
            "cRLSign"
        };
        return Ok(Some(format!(
            "peer certificate's key usage is a CA's (keyUsage {signs}), not a workload's"
        )));
    }
    if !usage.digital_signature() {
        return Ok(Some(
            "peer certificate's keyUsage lacks digitalSignature: its key may not sign a handshake"
                .to_owned(),
        ));
    }
    Ok(None)
}

fn uri_sans_in(certificate: &X509Certificate<'_>) -> Result<Vec<String>, VerifyError> {
    let extension = certificate
        .subject_alternative_name()
        .map_err(|e| VerifyError(format!("peer certificate has a malformed SAN: {e}")))?;
    Ok(extension
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some((*uri).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// A root of the trust bundle and the trust domain it vouches for (`None`: any).
#[derive(Debug, Clone)]
pub struct TrustRoot {
    pub der: CertificateDer<'static>,
    pub trust_domain: Option<String>,
}

/// Verifies a peer's chain and SPIFFE ID; used as rustls's client and server verifier.
#[derive(Debug)]
pub struct SpiffeVerifier {
    anchors: Vec<rustls::pki_types::TrustAnchor<'static>>,
    domains: Vec<Option<String>>,
    hints: Vec<DistinguishedName>,
    allowed: Option<Vec<String>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeVerifier {
    /// Build a verifier trusting `roots`; with `allowed`, only those SPIFFE IDs are accepted.
    pub fn new(roots: &[TrustRoot], allowed: Option<Vec<String>>) -> Result<Self, VerifyError> {
        if roots.is_empty() {
            return Err(VerifyError("the trust bundle holds no certificate".into()));
        }
        let mut anchors = Vec::with_capacity(roots.len());
        let mut domains = Vec::with_capacity(roots.len());
        let mut hints = Vec::with_capacity(roots.len());
        for root in roots {
            let anchor = webpki::anchor_from_trusted_cert(&root.der)
                .map_err(|e| VerifyError(format!("trust bundle certificate rejected: {e}")))?
                .to_owned();
            // A trust anchor's subject is the Name's content, without its outer SEQUENCE; a
            // CertificateRequest's certificate_authorities carry whole Names (RFC 8446 4.2.4).
            // GnuTLS clients (ngtcp2's gtlsclient) send no certificate for a bare one.
            hints.push(DistinguishedName::in_sequence(anchor.subject.as_ref()));
            anchors.push(anchor);
            domains.push(root.trust_domain.clone());
        }
        Ok(Self {
            anchors,
            domains,
            hints,
            allowed,
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        })
    }

    /// Verify `end_entity` (with the peer's `intermediates`) for `usage`; return its SPIFFE ID.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: Usage,
    ) -> Result<String, VerifyError> {
        let certificate = EndEntityCert::try_from(end_entity)
            .map_err(|e| VerifyError(format!("peer certificate cannot be parsed: {e}")))?;
        let path = certificate
            .verify_for_usage(
                self.algorithms.all,
                &self.anchors,
                intermediates,
                now,
                usage.key_usage(),
                None,
                None,
            )
            .map_err(|e| VerifyError(chain_problem(&e, usage)))?;
        let anchor = path.anchor();
        let domain = self
            .anchors
            .iter()
            .position(|a| {
                a.subject == anchor.subject
                    && a.subject_public_key_info == anchor.subject_public_key_info
            })
            .and_then(|i| self.domains[i].clone());
        let parsed = parse_peer_certificate(end_entity.as_ref())?;
        if let Some(problem) = leaf_key_usage_problem(&parsed)? {
            return Err(VerifyError(problem));
        }
        let uris = uri_sans_in(&parsed)?;
        let spiffe_id = match uris
            .iter()
            .find(|uri| uri.starts_with(SPIFFE_SCHEME_PREFIX))
        {
            None => return Err(VerifyError("peer certificate carries no SPIFFE ID".into())),
            Some(_) if uris.len() != 1 => {
                return Err(VerifyError(
                    "peer certificate carries more than one URI SAN".into(),
                ))
            }
            Some(uri) => uri.clone(),
        };
        if let Some(problem) = spiffe_id_problem(&spiffe_id) {
            return Err(VerifyError(format!(
                "peer certificate carries an invalid SPIFFE ID '{spiffe_id}': {problem}"
            )));
        }
        if let Some(problem) = leaf_id_problem(&spiffe_id) {
            return Err(VerifyError(format!("peer certificate carries {problem}")));
        }
        if let Some(domain) = domain {
            let peer_domain = trust_domain_of(&spiffe_id);
            if peer_domain != domain {
                return Err(VerifyError(format!(
                    "peer identity {spiffe_id} is in trust domain '{peer_domain}', but its CA \
                     vouches only for {domain}"
                )));
            }
        }
        if let Some(allowed) = &self.allowed {
            if !allowed.contains(&spiffe_id) {
                return Err(VerifyError(format!(
                    "peer identity {spiffe_id} is not one of the allowed identities ({})",
                    allowed.join(", ")
                )));
            }
        }
        Ok(spiffe_id)
    }

    fn to_tls_error(error: VerifyError) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
    }
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // SPIFFE names workloads by URI SAN, not by DNS name: the server name is not checked.
        self.verify(end_entity, intermediates, now, Usage::Server)
            .map(|_| ServerCertVerified::assertion())
            .map_err(Self::to_tls_error)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now, Usage::Client)
            .map(|_| ClientCertVerified::assertion())
            .map_err(Self::to_tls_error)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Which side's certificate is verified: the extended key usage it needs.
#[derive(Debug, Clone, Copy)]
pub enum Usage {
    Server,
    Client,
}

impl Usage {
    fn key_usage(self) -> KeyUsage {
        match self {
            Usage::Server => KeyUsage::server_auth(),
            Usage::Client => KeyUsage::client_auth(),
        }
    }

    /// The extended key usage's name, for messages.
    fn name(self) -> &'static str {
        match self {
            Usage::Server => "serverAuth",
            Usage::Client => "clientAuth",
        }
    }
}

/// What webpki found wrong with a peer's chain, in words (webpki shows its errors as
/// their Debug form: `CertExpired { time: UnixTime(..), .. }`).
fn chain_problem(error: &webpki::Error, usage: Usage) -> String {
    use webpki::Error;
    match error {
        Error::CertExpired { .. } => "peer certificate has expired".to_owned(),
        Error::CertNotValidYet { .. } => "peer certificate is not valid yet".to_owned(),
        // (webpki 0.103 gives the context variant; the plain one is kept for older ones)
        #[allow(deprecated)]
        Error::RequiredEkuNotFound | Error::RequiredEkuNotFoundContext(_) => {
            let wanted = usage.name();
            format!("peer certificate is not for this use (no {wanted} extended key usage)")
        }
        Error::UnknownIssuer => "peer certificate not signed by a trusted CA".to_owned(),
        Error::InvalidSignatureForPublicKey => {
            "peer certificate not signed by a trusted CA (its signature does not verify)".to_owned()
        }
        Error::CertRevoked => "peer certificate is revoked".to_owned(),
        Error::CaUsedAsEndEntity => {
            "peer certificate is a CA certificate (basicConstraints CA:true), not a workload's"
                .to_owned()
        }
        other => format!("peer certificate chain refused: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_problems_are_words() {
        let (server, client) = (Usage::Server, Usage::Client);
        assert_eq!(
            chain_problem(&webpki::Error::UnknownIssuer, server),
            "peer certificate not signed by a trusted CA"
        );
        #[allow(deprecated)]
        let no_usage = webpki::Error::RequiredEkuNotFound;
        assert_eq!(
            chain_problem(&no_usage, client),
            "peer certificate is not for this use (no clientAuth extended key usage)"
        );
        let expired = webpki::Error::CertExpired {
            time: UnixTime::since_unix_epoch(std::time::Duration::from_secs(2)),
            not_after: UnixTime::since_unix_epoch(std::time::Duration::from_secs(1)),
        };
        assert_eq!(
            chain_problem(&expired, server),
            "peer certificate has expired"
        );
        assert_eq!(
            chain_problem(&webpki::Error::CaUsedAsEndEntity, client),
            "peer certificate is a CA certificate (basicConstraints CA:true), not a workload's"
        );
    }

    #[test]
    fn a_leaf_id_has_a_path() {
        assert_eq!(leaf_id_problem("spiffe://mesh.local/ns/default/sa/x"), None);
        assert_eq!(
            leaf_id_problem("spiffe://mesh.local").as_deref(),
            Some("spiffe://mesh.local, a trust domain's ID with no path, not a workload's")
        );
    }

    #[test]
    fn valid_ids() {
        for id in [
            "spiffe://mesh.local",
            "spiffe://mesh.local/ns/default/sa/x",
            "spiffe://a-b_c.1/A.b-c_d",
        ] {
            assert_eq!(spiffe_id_problem(id), None, "{id}");
        }
    }

    #[test]
    fn invalid_ids() {
        for id in [
            "",
            "SPIFFE://mesh.local/x",
            "https://mesh.local/x",
            "spiffe://",
            "spiffe:///x",
            "spiffe://Mesh.local/x",
            "spiffe://mesh.local:443/x",
            "spiffe://user@mesh.local/x",
            "spiffe://mesh.local/x/",
            "spiffe://mesh.local//x",
            "spiffe://mesh.local/./x",
            "spiffe://mesh.local/x/..",
            "spiffe://mesh.local/x?y",
            "spiffe://mesh.local/x#y",
            "spiffe://mesh.local/x%20y",
        ] {
            assert!(spiffe_id_problem(id).is_some(), "{id}");
        }
        let long = format!("spiffe://mesh.local/{}", "a".repeat(MAX_SPIFFE_ID_BYTES));
        assert_eq!(
            spiffe_id_problem(&long),
            Some("it is longer than 2048 bytes")
        );
    }

    #[test]
    fn trust_domain() {
        assert_eq!(trust_domain_of("spiffe://mesh.local/x/y"), "mesh.local");
        assert_eq!(trust_domain_of("spiffe://mesh.local"), "mesh.local");
    }

    /// A throwaway self-signed CA ("CN=hint test CA", P-256), for the hints test.
    const HINT_TEST_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBMTCB2KADAgECAgEBMAoGCCqGSM49BAMCMBcxFTATBgNVBAMMDGhpbnQgdGVz
dCBDQTAgFw0yNjAxMDEwMDAwMDBaGA8yMTI1MTIwODAwMDAwMFowFzEVMBMGA1UE
AwwMaGludCB0ZXN0IENBMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEELE9WfIu
f+OfS7VkYdKM1w+Jmf7ccxgY9bEnGIcStDkBUlzcfo1D6HPOkRcoZXBWTxijSGk9
+0e5a/kPkCgc16MTMBEwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBF
AiBlqIBaFNpXCYmBAot/RxRRi1RSSBjPhiApzugqz6TeJAIhAPWpl4DbcElfxbzc
YMl3BJFcg+9yOUWohDCdCQwAyWNF
-----END CERTIFICATE-----
";

    /// A self-signed test certificate, keyUsage keyCertSign,digitalSignature (openssl req -x509).
    const CERT_SIGNING_LEAF: &str = "\
-----BEGIN CERTIFICATE-----
MIIBezCCASKgAwIBAgIUVBghdiX4WYu1IUxltQu6NRV/kYwwCgYIKoZIzj0EAwIw
DDEKMAgGA1UEAwwBdDAgFw0yNjEyMDcxMjUzMTJaGA8yMTI2MTExMzEyNTMxMlow
DDEKMAgGA1UEAwwBdDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABKvKgutCGy3O
dAyi/Qf6RIImYZ0UVuz+BBK/D0a6QNJOqX5JxiMC1ibhiaZi6Rq5ORUr2VspqoCF
OYyhaOOzew2jYDBeMB0GA1UdDgQWBBQT7uxalSzOT1KPNQeEbO22moW0VzAfBgNV
HSMEGDAWgBQT7uxalSzOT1KPNQeEbO22moW0VzAOBgNVHQ8BAf8EBAMCAoQwDAYD
VR0TAQH/BAIwADAKBggqhkjOPQQDAgNHADBEAiBTafqfWX9YjAh4IUsQSmIUwC7f
nd9VvvK7qCXJvhUpEAIgDzQMhjPwfm3UoAnIOVCj93ny+rDQhOYujsYizd4yxfc=
-----END CERTIFICATE-----
";
    /// A self-signed test certificate, keyUsage cRLSign,digitalSignature (openssl req -x509).
    const CRL_SIGNING_LEAF: &str = "\
-----BEGIN CERTIFICATE-----
MIIBezCCASKgAwIBAgIUSIvCQnbBesAzUo+g9nX+7iDWSzEwCgYIKoZIzj0EAwIw
DDEKMAgGA1UEAwwBdDAgFw0yNjEyMDcxMjUzMTJaGA8yMTI2MTExMzEyNTMxMlow
DDEKMAgGA1UEAwwBdDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABPHI03k3JzR9
ba6Orbw8xVo+N9ZcW3vcmb5nlANNyHEhiWRnt9/aeCiiwtkyTRk5fN8Ix5f2K69Z
bNc0B4kMQ+KjYDBeMB0GA1UdDgQWBBQzWiDWalJ+VnQOj4B2Nqpv75E7wzAfBgNV
HSMEGDAWgBQzWiDWalJ+VnQOj4B2Nqpv75E7wzAOBgNVHQ8BAf8EBAMCAYIwDAYD
VR0TAQH/BAIwADAKBggqhkjOPQQDAgNHADBEAiAiK5xIXKq6Sk4cGiHf/n9Sf8lx
SBe1TmRqI3Ee8aqSowIgffbji7CijJx9zc5YzJzoRkdwmySvbogQzfcp8HHhUyU=
-----END CERTIFICATE-----
";
    /// A self-signed test certificate, keyUsage keyEncipherment (openssl req -x509).
    const NO_SIGNATURE_LEAF: &str = "\
-----BEGIN CERTIFICATE-----
MIIBezCCASKgAwIBAgIUeJFNmpvj9lQjnMsxP37XhOsLMU0wCgYIKoZIzj0EAwIw
DDEKMAgGA1UEAwwBdDAgFw0yNjEyMDcxMjUzMTJaGA8yMTI2MTExMzEyNTMxMlow
DDEKMAgGA1UEAwwBdDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABL0jXbGhK0Ue
ap+pHUQvaM/PpJb7LvEhwb7So90oreIFE0q9EslUMAHqZRUrfC3MNUpB1jkY7v6k
6gRrT1RHc1WjYDBeMB0GA1UdDgQWBBRwMkkdPqTUWytLg1z+v1CkY0FEjDAfBgNV
HSMEGDAWgBRwMkkdPqTUWytLg1z+v1CkY0FEjDAOBgNVHQ8BAf8EBAMCBSAwDAYD
VR0TAQH/BAIwADAKBggqhkjOPQQDAgNHADBEAiBdSjsxBBbxPA2HQm0+4DfaRJUH
laGXWvkiB6EvXzuoMQIgVUvEhq+mnYpgmysSx+rMVdZ1oM1cXZT9Xd1/NAUDFSo=
-----END CERTIFICATE-----
";
    /// A self-signed test certificate, keyUsage digitalSignature,keyEncipherment (openssl req -x509).
    const USUAL_LEAF: &str = "\
-----BEGIN CERTIFICATE-----
MIIBezCCASKgAwIBAgIUQt+a1dotiHtlJiWIC5zgk6klWpQwCgYIKoZIzj0EAwIw
DDEKMAgGA1UEAwwBdDAgFw0yNjEyMDcxMjUzMTJaGA8yMTI2MTExMzEyNTMxMlow
DDEKMAgGA1UEAwwBdDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABNn6Lbf2ML33
ezUZbKCeyXATOHCHISWZFZk8uBvUBjhMKr1T35kG4uC2nVVSNdYH57lHVhvzhQff
Zybq8jO4TjajYDBeMB0GA1UdDgQWBBT4cCsHCCB5F743sCENy7MjMfMPWTAfBgNV
HSMEGDAWgBT4cCsHCCB5F743sCENy7MjMfMPWTAOBgNVHQ8BAf8EBAMCBaAwDAYD
VR0TAQH/BAIwADAKBggqhkjOPQQDAgNHADBEAiBSsJ3TpEgLnetM/sdzMU23oxEF
mJPS4wy4PNEWgenvsQIgY8z3bqAZMAjCWekwh1j+r6L4atQDcuMGIneoiJayfDE=
-----END CERTIFICATE-----
";

    #[test]
    fn a_leafs_key_usages_are_a_workloads() {
        use rustls::pki_types::pem::PemObject;
        let problem = |pem: &str| {
            let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("test certificate");
            let parsed = parse_peer_certificate(der.as_ref()).expect("parses");
            leaf_key_usage_problem(&parsed).expect("a well-formed keyUsage")
        };
        assert_eq!(problem(USUAL_LEAF), None);
        assert_eq!(problem(HINT_TEST_CA), None); // names no key usage
        assert_eq!(
            problem(CERT_SIGNING_LEAF).as_deref(),
            Some("peer certificate's key usage is a CA's (keyUsage keyCertSign), not a workload's")
        );
        assert_eq!(
            problem(CRL_SIGNING_LEAF).as_deref(),
            Some("peer certificate's key usage is a CA's (keyUsage cRLSign), not a workload's")
        );
        assert_eq!(
            problem(NO_SIGNATURE_LEAF).as_deref(),
            Some("peer certificate's keyUsage lacks digitalSignature: its key may not sign a handshake")
        );
    }

    #[test]
    fn client_certificate_hints_are_whole_names() {
        use rustls::pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(HINT_TEST_CA.as_bytes()).expect("test CA");
        let (_, ca) = X509Certificate::from_der(der.as_ref()).expect("test CA parses");
        let root = TrustRoot {
            der: der.clone(),
            trust_domain: None,
        };
        let verifier = SpiffeVerifier::new(&[root], None).expect("verifier");
        let hints = ClientCertVerifier::root_hint_subjects(&verifier);
        assert_eq!(hints.len(), 1);
        // The DER of the CA's subject Name, outer SEQUENCE included (what a client matches
        // its certificate's issuer against).
        assert_eq!(hints[0].as_ref(), ca.subject().as_raw());
    }

    #[test]
    fn empty_bundle_refused() {
        assert!(SpiffeVerifier::new(&[], None).is_err());
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(uri_sans_of(b"not a certificate").is_err());
        let root = TrustRoot {
            der: CertificateDer::from(b"junk".to_vec()),
            trust_domain: None,
        };
        assert!(SpiffeVerifier::new(&[root], None).is_err());
    }
}

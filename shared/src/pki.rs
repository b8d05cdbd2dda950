//! Trust: pinning the coordinator CA, reading a node's identity from its certificate, and the TLS
//! configurations both ends of the QUIC link use.
//!
//! The coordinator presents a server certificate for [`COORDINATOR_SERVER_NAME`] signed by its CA
//! and sends the CA along. An agent that is not yet enrolled trusts that CA only when its sha256
//! matches the pin the operator gave it (`--ca-hash sha256:<hex>`), as `kubeadm join` does. Node
//! certificates carry the node name as their subject common name and only the client-auth usage, so
//! a node certificate can never pass as the coordinator.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::proto::{ALPN_ENROLL, ALPN_LINK};

/// The DNS name in the coordinator's server certificate; agents verify it whatever address they dial.
pub const COORDINATOR_SERVER_NAME: &str = "coordinator.hexabase.internal";
/// A connection with nothing received for this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// The agent pings this often, well under [`IDLE_TIMEOUT`], so a quiet link stays up.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(4);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("CA hash {0:?} is not of the form sha256:<64 hex digits>")]
    BadCaHash(String),
    #[error("certificate cannot be parsed: {0}")]
    BadCertificate(String),
    #[error("certificate has no subject common name to identify the node")]
    NoCommonName,
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("TLS verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC does not accept this TLS configuration: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// The sha256 of a DER certificate, written `sha256:<hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaHash([u8; 32]);

impl CaHash {
    pub fn of(der: &[u8]) -> CaHash {
        CaHash(Sha256::digest(der).into())
    }
}

impl fmt::Display for CaHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for CaHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for CaHash {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PkiError::BadCaHash(s.to_string());
        let hex_part = s.trim().strip_prefix("sha256:").ok_or_else(bad)?;
        let bytes = hex::decode(hex_part).map_err(|_| bad())?;
        Ok(CaHash(bytes.try_into().map_err(|_| bad())?))
    }
}

/// Who a certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    pub common_name: String,
    /// Lowercase hex of the serial number; the coordinator keeps the current one per node.
    pub serial: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
}

/// Reads the identity of a DER certificate.
pub fn cert_identity(der: &[u8]) -> Result<CertIdentity, PkiError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or(PkiError::NoCommonName)?
        .to_string();
    Ok(CertIdentity {
        common_name,
        serial: hex::encode(cert.raw_serial()),
        not_before_unix: cert.validity().not_before.timestamp(),
        not_after_unix: cert.validity().not_after.timestamp(),
    })
}

/// The certificate chain a peer presented on a QUIC connection, if any.
pub fn peer_certificates(conn: &quinn::Connection) -> Option<Vec<CertificateDer<'static>>> {
    conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok().map(|chain| *chain)
}

/// The ALPN protocol a QUIC connection agreed on.
pub fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?.downcast::<quinn::crypto::rustls::HandshakeData>().ok().and_then(|hd| hd.protocol)
}

/// Flow-control window of a stream (bytes).
const RECEIVE_WINDOW: u32 = 256 * 1024;

/// QUIC transport settings: idle timeout, keep-alive (client side), and no more streams than the
/// protocols use, so a peer cannot make us hold state for streams we never read.
pub fn transport_config(keep_alive: bool) -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(IDLE_TIMEOUT).unwrap_or_else(|_| quinn::VarInt::from_u32(15_000).into()),
        ))
        .keep_alive_interval(keep_alive.then_some(KEEP_ALIVE_INTERVAL))
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(1))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0))
        // Neither protocol uses datagrams; a peer must not be able to fill a buffer with them.
        .datagram_receive_buffer_size(None)
        // What a peer may have in flight before we read it. A 1 MiB spec still flows, a window at
        // a time; an unauthenticated peer cannot park more than this in our memory.
        .stream_receive_window(quinn::VarInt::from_u32(RECEIVE_WINDOW))
        .receive_window(quinn::VarInt::from_u32(2 * RECEIVE_WINDOW));
    Arc::new(transport)
}

fn quic_client(mut tls: rustls::ClientConfig, alpn: &[u8]) -> Result<quinn::ClientConfig, PkiError> {
    tls.alpn_protocols = vec![alpn.to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls)?));
    config.transport_config(transport_config(true));
    Ok(config)
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, PkiError> {
    let mut store = RootCertStore::empty();
    store.add(ca.clone())?;
    Ok(Arc::new(store))
}

/// Client configuration for enrollment: trusts the server only if it presents, in its chain, a CA
/// whose sha256 is `pin` and a server certificate that CA signed for [`COORDINATOR_SERVER_NAME`].
pub fn enroll_client_config(pin: CaHash) -> Result<quinn::ClientConfig, PkiError> {
    let tls = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier::new(pin)))
        .with_no_client_auth();
    quic_client(tls, ALPN_ENROLL)
}

/// Client configuration for the mutual-TLS link: trusts exactly `ca` and presents `chain`/`key`.
pub fn link_client_config(
    ca: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<quinn::ClientConfig, PkiError> {
    let tls = rustls::ClientConfig::builder().with_root_certificates(roots(ca)?).with_client_auth_cert(chain, key)?;
    quic_client(tls, ALPN_LINK)
}

/// A link client that presents no certificate. The coordinator must refuse it; tests use it to
/// prove that.
pub fn anonymous_link_client_config(ca: &CertificateDer<'static>) -> Result<quinn::ClientConfig, PkiError> {
    let tls = rustls::ClientConfig::builder().with_root_certificates(roots(ca)?).with_no_client_auth();
    quic_client(tls, ALPN_LINK)
}

/// The coordinator's server configuration: both ALPNs; client certificates from `ca` are
/// verified when presented and required by the link (checked after the handshake, because
/// enrollment happens before a node has one).
pub fn server_config(
    ca: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<quinn::ServerConfig, PkiError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder(roots(ca)?).allow_unauthenticated().build()?;
    let mut tls = rustls::ServerConfig::builder().with_client_cert_verifier(verifier).with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![ALPN_ENROLL.to_vec(), ALPN_LINK.to_vec()];
    let mut config =
        quinn::ServerConfig::with_crypto(Arc::new(quinn::crypto::rustls::QuicServerConfig::try_from(tls)?));
    config.transport_config(transport_config(false));
    Ok(config)
}

/// Verifies the coordinator during enrollment against a pinned CA hash.
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: CaHash,
    schemes: Vec<SignatureScheme>,
}

impl PinnedCaVerifier {
    fn new(pin: CaHash) -> Self {
        let schemes = rustls::crypto::ring::default_provider().signature_verification_algorithms.supported_schemes();
        PinnedCaVerifier { pin, schemes }
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|cert| CaHash::of(cert) == self.pin) else {
            let presented: Vec<String> = intermediates.iter().map(|c| CaHash::of(c).to_string()).collect();
            return Err(rustls::Error::General(format!(
                "CA pin mismatch: expected {}, the coordinator presented {}",
                self.pin,
                if presented.is_empty() { "no CA".to_string() } else { presented.join(", ") }
            )));
        };
        let mut store = RootCertStore::empty();
        store.add(ca.clone().into_owned())?;
        let verifier = WebPkiServerVerifier::builder(Arc::new(store))
            .build()
            .map_err(|e| rustls::Error::General(format!("pinned CA unusable: {e}")))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_hash_parses_and_prints() {
        let hash = CaHash::of(b"certificate");
        let text = hash.to_string();
        assert!(text.starts_with("sha256:") && text.len() == 7 + 64);
        assert_eq!(text.parse::<CaHash>().unwrap(), hash);
        for bad in ["", "sha256:", "sha256:abc", "md5:00", &text[7..], &format!("{text}00")] {
            let err = bad.parse::<CaHash>().unwrap_err();
            assert!(err.to_string().contains("sha256:<64 hex digits>"), "{bad}: {err}");
        }
    }
}

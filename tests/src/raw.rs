//! QUIC peers driven by hand, to send what a well-behaved agent never would.

use std::net::SocketAddr;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use hexa_shared::pki::{self, COORDINATOR_SERVER_NAME, CaHash};
use hexa_shared::proto::{
    EnrollRequest, EnrollResponse, Enrolled, Hello, PROTOCOL_VERSION, ProviderIdentity, SystemInfo,
};
use hexa_shared::wire;

pub fn client_endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client("127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!())).expect("client endpoint")
}

/// A key and an enrollment request for it.
pub fn enroll_request(token: &str, name: &str) -> (KeyPair, EnrollRequest) {
    let key = KeyPair::generate().expect("key");
    let csr = CertificateParams::default().serialize_request(&key).expect("csr");
    let req = EnrollRequest {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "test".into(),
        token: token.into(),
        csr_der: csr.der().to_vec(),
        hostname: format!("{name}.example"),
        machine_id: format!("machine-{name}"),
        requested_name: Some(name.into()),
        provider: ProviderIdentity::None,
    };
    (key, req)
}

/// Sends one enrollment payload (already framed or deliberately broken) and returns the answer, or
/// the error that ended the exchange.
pub async fn enroll_bytes(addr: SocketAddr, pin: CaHash, frame: &[u8]) -> Result<EnrollResponse, String> {
    let endpoint = client_endpoint();
    let config = pki::enroll_client_config(pin).map_err(|e| e.to_string())?;
    let conn = endpoint
        .connect_with(config, addr, COORDINATOR_SERVER_NAME)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(frame).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    let answer = tokio::time::timeout(Duration::from_secs(10), wire::read_frame::<EnrollResponse, _>(&mut recv))
        .await
        .map_err(|_| "no answer".to_string())?;
    conn.close(0u32.into(), b"done");
    match answer {
        Ok(Some(resp)) => Ok(resp),
        Ok(None) => Err("closed without an answer".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// The code and message of an enrollment that must have been refused.
pub fn refusal_of(answer: Result<EnrollResponse, String>) -> (hexa_shared::proto::RefusalCode, String) {
    match answer {
        Ok(EnrollResponse::Refused(r)) => (r.code, r.message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

pub async fn enroll(addr: SocketAddr, pin: CaHash, req: &EnrollRequest) -> Result<EnrollResponse, String> {
    enroll_bytes(addr, pin, &wire::encode_frame(req).map_err(|e| e.to_string())?).await
}

/// Credentials of an enrolled node, for a hand-driven link.
#[derive(Debug)]
pub struct NodeCreds {
    pub name: String,
    pub key_der: Vec<u8>,
    pub chain: Vec<CertificateDer<'static>>,
    pub ca: CertificateDer<'static>,
}

impl NodeCreds {
    pub fn from_enrollment(key: &KeyPair, enrolled: Enrolled) -> NodeCreds {
        NodeCreds {
            name: enrolled.node_name,
            key_der: key.serialize_der(),
            chain: enrolled.cert_chain_der.into_iter().map(CertificateDer::from).collect(),
            ca: CertificateDer::from(enrolled.ca_der),
        }
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    pub fn link_config(&self) -> quinn::ClientConfig {
        pki::link_client_config(&self.ca, self.chain.clone(), self.key()).expect("link config")
    }
}

/// Enrolls a node by hand with `token` and returns its credentials.
pub async fn enroll_node(addr: SocketAddr, pin: CaHash, token: &str, name: &str) -> NodeCreds {
    let (key, req) = enroll_request(token, name);
    match enroll(addr, pin, &req).await {
        Ok(EnrollResponse::Accepted(enrolled)) => NodeCreds::from_enrollment(&key, enrolled),
        other => panic!("enrollment of {name} failed: {other:?}"),
    }
}

pub fn hello(name: &str, version: u32) -> Hello {
    Hello {
        protocol_version: version,
        agent_version: "test".into(),
        node_name: name.into(),
        applied_generation: 0,
        system: SystemInfo::default(),
    }
}

/// An open link: the connection and its control stream.
#[derive(Debug)]
pub struct RawLink {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

/// Connects on `hexa/1` with `config` and opens the control stream; Err is the handshake error.
pub async fn open_link(addr: SocketAddr, config: quinn::ClientConfig) -> Result<RawLink, String> {
    let endpoint = client_endpoint();
    let conn = endpoint
        .connect_with(config, addr, COORDINATOR_SERVER_NAME)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    Ok(RawLink { endpoint, conn, send, recv })
}

impl RawLink {
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        let _ = self.send.write_all(bytes).await;
    }

    pub async fn send<T: serde::Serialize>(&mut self, msg: &T) {
        let frame = wire::encode_frame(msg).expect("encode");
        self.send_bytes(&frame).await;
    }

    pub async fn recv<T: serde::de::DeserializeOwned>(&mut self) -> Option<T> {
        tokio::time::timeout(Duration::from_secs(10), wire::read_frame(&mut self.recv)).await.ok()?.ok()?
    }

    /// Waits for the coordinator to close the connection and returns its stated reason.
    pub async fn closed_reason(&self) -> String {
        match tokio::time::timeout(Duration::from_secs(10), self.conn.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(close)) => String::from_utf8_lossy(&close.reason).into_owned(),
            Ok(other) => other.to_string(),
            Err(_) => "still open after 10s".into(),
        }
    }
}

/// A CA nobody trusts and a client certificate from it, named like a real node.
pub fn foreign_client_cert(name: &str) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "rogue CA");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).expect("sign");
    (cert.der().clone(), PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
}

/// Connects on `hexa/1` expecting to be turned away, and returns the reason the coordinator gave,
/// whether it arrived during the handshake, on opening the stream, or as a close afterwards.
pub async fn refused_link(addr: SocketAddr, config: quinn::ClientConfig) -> String {
    match open_link(addr, config).await {
        Err(e) => e,
        Ok(link) => link.closed_reason().await,
    }
}

//! Enrollment: one request on `hexa-enroll/1`, trusting the coordinator only through the CA pin.

use std::net::SocketAddr;

use rcgen::{CertificateParams, KeyPair};

use hexa_shared::pki::{self, COORDINATOR_SERVER_NAME, CaHash};
use hexa_shared::proto::{
    EnrollRequest, EnrollResponse, Enrolled, PROTOCOL_VERSION, ProviderIdentity, Refusal, close_code,
};
use hexa_shared::wire;

use crate::error::{AgentError, ConnectError};
use crate::state::StateDir;

/// A fresh key (generated on this node; it never leaves it) and a CSR for it.
pub fn new_key_and_csr() -> Result<(KeyPair, Vec<u8>), AgentError> {
    let key = KeyPair::generate().map_err(AgentError::Crypto)?;
    // The coordinator chooses the identity: the CSR carries only the public key.
    let csr = CertificateParams::default().serialize_request(&key).map_err(AgentError::Crypto)?;
    Ok((key, csr.der().to_vec()))
}

/// What the node tells the coordinator about itself when it enrolls.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub hostname: String,
    pub machine_id: String,
    pub requested_name: Option<String>,
    pub provider: ProviderIdentity,
}

impl NodeFacts {
    pub fn of_this_machine(requested_name: &str) -> NodeFacts {
        NodeFacts {
            hostname: sysinfo::System::host_name().unwrap_or_default(),
            machine_id: std::fs::read_to_string("/etc/machine-id").map(|s| s.trim().to_string()).unwrap_or_default(),
            requested_name: (!requested_name.is_empty()).then(|| requested_name.to_string()),
            provider: ProviderIdentity::None,
        }
    }
}

/// Enrolls with the coordinator at `addr` and saves key, certificate and CA in `state`.
pub async fn enroll(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    token: &str,
    pin: CaHash,
    facts: &NodeFacts,
    state: &StateDir,
) -> Result<Enrolled, AgentError> {
    let (key, csr_der) = new_key_and_csr()?;
    let config = pki::enroll_client_config(pin)?;
    let conn = endpoint
        .connect_with(config, addr, COORDINATOR_SERVER_NAME)
        .map_err(ConnectError::Connect)?
        .await
        .map_err(ConnectError::Connection)?;
    let request = EnrollRequest {
        protocol_version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        token: token.to_string(),
        csr_der,
        hostname: facts.hostname.clone(),
        machine_id: facts.machine_id.clone(),
        requested_name: facts.requested_name.clone(),
        provider: facts.provider.clone(),
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(ConnectError::Connection)?;
    wire::write_frame(&mut send, &request).await?;
    let _ = send.finish();
    let response: Option<EnrollResponse> = wire::read_frame(&mut recv).await?;
    conn.close(close_code::DONE.into(), b"enrolled");
    match response {
        Some(EnrollResponse::Accepted(enrolled)) => {
            state.save_enrollment(&key.serialize_pem(), &enrolled.cert_chain_der, &enrolled.ca_der)?;
            tracing::info!(node = %enrolled.node_name, pool = %enrolled.pool, "enrolled");
            Ok(enrolled)
        }
        Some(EnrollResponse::Refused(refusal)) => Err(AgentError::Refused(refusal)),
        None => Err(AgentError::Refused(Refusal {
            code: hexa_shared::proto::RefusalCode::Internal,
            message: "the coordinator closed the enrollment without an answer".into(),
        })),
    }
}

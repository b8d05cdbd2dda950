//! Enrollment: one request on `hexa-enroll/1`, trusting the coordinator only through the CA pin.

use std::net::SocketAddr;

use rcgen::{CertificateParams, KeyPair};

use hexa_shared::pki::{self, COORDINATOR_SERVER_NAME, CaHash};
use hexa_shared::proto::{
    EnrollRequest, EnrollResponse, Enrolled, PROTOCOL_VERSION, ProviderIdentity, Refusal, close_code,
};
use hexa_shared::wire;

use crate::error::{AgentError, ConfigError, ConnectError};
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

/// Where the SMBIOS uuid is, under the sysfs root.
pub const PRODUCT_UUID: &str = "class/dmi/id/product_uuid";

/// The machine's provider identity: a Proxmox VM when `proxmox_vmid` is set, with the SMBIOS uuid
/// read from `<sys_root>/class/dmi/id/product_uuid` (lowercase, as PVE writes it in `smbios1`).
pub fn provider_identity(sys_root: &std::path::Path, proxmox_vmid: u32) -> Result<ProviderIdentity, ConfigError> {
    if proxmox_vmid == 0 {
        return Ok(ProviderIdentity::None);
    }
    let path = sys_root.join(PRODUCT_UUID);
    let unreadable = |error: String| ConfigError::ProviderIdentity { vmid: proxmox_vmid, path: path.clone(), error };
    let uuid = std::fs::read_to_string(&path).map_err(|e| unreadable(e.to_string()))?.trim().to_ascii_lowercase();
    if uuid.is_empty() {
        return Err(unreadable("empty".into()));
    }
    Ok(ProviderIdentity::Proxmox { vmid: proxmox_vmid, smbios_uuid: uuid })
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
    let (key, enrolled) = request_certificate(endpoint, addr, token, pin, facts).await?;
    state.save_enrollment(&key.serialize_pem(), &enrolled.cert_chain_der, &enrolled.ca_der)?;
    tracing::info!(node = %enrolled.node_name, pool = %enrolled.pool, "enrolled");
    Ok(enrolled)
}

/// One enrollment with the coordinator at `addr`: a fresh key, its CSR and `token` sent over the
/// shared `endpoint` to a coordinator trusted only through `pin`. Returns the key and what the
/// coordinator issued for it; keeping them is the caller's.
pub async fn request_certificate(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    token: &str,
    pin: CaHash,
    facts: &NodeFacts,
) -> Result<(KeyPair, Enrolled), AgentError> {
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
        Some(EnrollResponse::Accepted(enrolled)) => Ok((key, enrolled)),
        Some(EnrollResponse::Refused(refusal)) if refusal.code == hexa_shared::proto::RefusalCode::NotLeader => {
            Err(AgentError::NotLeader { leader: None, message: refusal.message })
        }
        Some(EnrollResponse::FollowLeader { leader }) => {
            Err(AgentError::NotLeader { message: format!("the leader is at {leader}"), leader: Some(leader) })
        }
        Some(EnrollResponse::Refused(refusal)) => Err(AgentError::Refused(refusal)),
        None => Err(AgentError::Refused(Refusal {
            code: hexa_shared::proto::RefusalCode::Internal,
            message: "the coordinator closed the enrollment without an answer".into(),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_provider_identity_comes_from_the_smbios_uuid_and_the_configured_vmid() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(provider_identity(root.path(), 0).unwrap(), ProviderIdentity::None);
        let err = provider_identity(root.path(), 105).unwrap_err().to_string();
        assert!(err.contains("proxmox_vmid is 105") && err.contains("product_uuid"), "{err}");
        let file = root.path().join(PRODUCT_UUID);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, "0D6F2B4A-1C2E-4F5A-9B8C-7D6E5F4A3B2C\n").unwrap();
        assert_eq!(
            provider_identity(root.path(), 105).unwrap(),
            ProviderIdentity::Proxmox { vmid: 105, smbios_uuid: "0d6f2b4a-1c2e-4f5a-9b8c-7d6e5f4a3b2c".into() }
        );
    }
}

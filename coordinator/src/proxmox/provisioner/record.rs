//! A VM's persisted record and its view in `/v1/provisioning`.

use serde::{Deserialize, Serialize};

use hexa_shared::proto::ProviderIdentity;

/// Where a VM is in its life.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Requested,
    Cloning,
    Configuring,
    Starting,
    WaitingForRegistration,
    Bound,
    Draining,
    Stopping,
    Destroying,
}

impl VmState {
    /// Counts towards the tenant's VMs (not on its way out).
    pub(super) fn active(self) -> bool {
        !matches!(self, VmState::Draining | VmState::Stopping | VmState::Destroying)
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = serde_json::to_value(self).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        f.write_str(&text)
    }
}

/// One VM, as the state database keeps it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct VmRecord {
    /// Random, 10 characters; the VM is `hx-<id>` in PVE and the node `hx-<id>`.
    pub id: String,
    pub tenant: String,
    pub node_class: String,
    pub state: VmState,
    pub created_unix_ms: u64,
    pub state_since_unix_ms: u64,
    /// No step before this (backoff after a failed one).
    #[serde(default)]
    pub not_before_unix_ms: u64,
    pub pve_node: Option<String>,
    pub vmid: Option<u32>,
    /// The in-flight clone task, when its answer came.
    #[serde(default)]
    pub upid: Option<String>,
    pub smbios_uuid: String,
    /// Path component of the seed URL; cleared once the node is bound.
    pub seed_id: Option<String>,
    pub token_id: Option<String>,
    /// The one-time token the seed hands out; cleared once the node is bound.
    pub token_secret: Option<String>,
    /// Why this VM is being removed (and the record goes when it is gone); set by the plan or a failure.
    #[serde(default)]
    pub retire: Option<String>,
    pub last_error: Option<String>,
    /// Failed VMs before this one for the same slot, for the replacement backoff.
    #[serde(default)]
    pub generation: u32,
}

impl VmRecord {
    pub fn vm_name(&self) -> String {
        format!("hx-{}", self.id)
    }

    pub fn node_name(&self) -> String {
        self.vm_name()
    }

    pub fn identity(&self) -> Option<ProviderIdentity> {
        self.vmid.map(|vmid| ProviderIdentity::Proxmox { vmid, smbios_uuid: self.smbios_uuid.clone() })
    }

    pub(super) fn tags(&self, extra: &[String]) -> String {
        let mut tags =
            vec!["hexabase".to_string(), format!("hx-tenant-{}", self.tenant), format!("hx-rec-{}", self.id)];
        tags.extend(extra.iter().cloned());
        tags.join(";")
    }
}

/// A VM as `/v1/provisioning` shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, utoipa::ToSchema)]
pub struct VmView {
    pub record: String,
    pub tenant: String,
    pub node_class: String,
    pub state: VmState,
    /// Since the record was made.
    pub age_seconds: u64,
    /// In the current state.
    pub state_seconds: u64,
    pub proxmox_node: Option<String>,
    pub vmid: Option<u32>,
    pub node_name: String,
    pub last_error: Option<String>,
}

/// A VM that was destroyed because it failed, as `/v1/provisioning` keeps showing it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, utoipa::ToSchema)]
pub struct Failure {
    pub at_unix: i64,
    pub tenant: String,
    pub record: String,
    pub vmid: Option<u32>,
    /// The state it failed in.
    pub state: VmState,
    pub reason: String,
}

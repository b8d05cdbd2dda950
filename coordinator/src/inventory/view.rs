//! A node as the admin API shows it.

use serde::{Deserialize, Serialize};

use hexa_shared::names::Pool;
use hexa_shared::proto::ProviderIdentity;
use hexa_shared::report::{Resources, Usage};
use hexa_shared::spec::TenantAllocation;

use crate::store::Health;

/// Who a node is according to the infrastructure that made it, as the admin API shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, utoipa::ToSchema)]
pub struct ProviderView {
    pub kind: ProviderKind,
    /// The Proxmox VMID, for `proxmox`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmid: Option<u32>,
    /// The VM's SMBIOS uuid, for `proxmox`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smbios_uuid: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Bare metal, or a machine no provider vouches for.
    None,
    /// A Proxmox VE virtual machine.
    Proxmox,
}

impl From<&ProviderIdentity> for ProviderView {
    fn from(identity: &ProviderIdentity) -> Self {
        match identity {
            ProviderIdentity::None => ProviderView { kind: ProviderKind::None, vmid: None, smbios_uuid: None },
            ProviderIdentity::Proxmox { vmid, smbios_uuid } => {
                ProviderView { kind: ProviderKind::Proxmox, vmid: Some(*vmid), smbios_uuid: Some(smbios_uuid.clone()) }
            }
        }
    }
}

/// A node as the admin API shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, utoipa::ToSchema)]
pub struct NodeView {
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub name: String,
    pub pool: Pool,
    pub health: Health,
    pub health_since_unix: i64,
    pub connected: bool,
    pub hostname: String,
    pub machine_id: String,
    pub provider: ProviderView,
    pub enrolled_at_unix: i64,
    pub cert_not_after_unix: i64,
    pub cordoned: bool,
    /// When an operator revoked the node's certificate; a revoked node opens no link.
    #[serde(default)]
    pub revoked_at_unix: Option<i64>,
    pub node_class: Option<String>,
    /// Tenants placed on this node and their allocations (the desired state sent to it).
    pub tenants: Vec<TenantAllocation>,
    pub spec_generation: u64,
    pub applied_generation: Option<u64>,
    pub apply_error: Option<String>,
    /// Age of the latest report when this view was taken.
    pub last_report_age_ms: Option<u64>,
    pub last_report_seq: Option<u64>,
    pub capacity: Option<Resources>,
    pub allocatable: Option<Resources>,
    pub usage: Option<Usage>,
    /// K3s on the node, as its latest report says.
    pub k3s: Option<hexa_shared::k3s::K3sState>,
    /// Each tenant's use of the node, from its pods' cgroups.
    pub tenant_usage: Vec<hexa_shared::report::TenantUsage>,
    /// Firewall reconciles that only had to put the node's rules back in front of another
    /// program's, since its agent started (from its latest report).
    pub firewall_displacements: Option<u64>,
}

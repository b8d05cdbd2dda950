//! Tenant isolation on a node: which addresses are pods, which are management hosts, which pods
//! belong to which tenant. What share of the node each tenant may use is not here: it is the
//! node's allocations (`NodeSpec::tenants`, [`crate::spec::TenantAllocation`]), which the cgroup
//! governor enforces whether or not the node gets an isolation spec.
//!
//! The coordinator builds one [`IsolationSpec`] per node from its pod ownership map (the host
//! cluster's API, or each node's word inside its own pod range only) and sends
//! each node only the tenants it hosts, each with its pod IPs *cluster-wide* (a pod on this node must
//! be able to reach its tenant's pods on other nodes). The agent turns it into firewall rules
//! (`isolation::firewall`), together with what only the node itself knows (which bridge port each
//! of its own pods sends from). Pods reach node addresses only through [`NodeService`]s. The
//! cluster's pod network is IPv4; pods' IPv6 is dropped altogether.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::names::{NameError, validate_tenant_name};

/// Most pod IPs one tenant (or the system pods) may have cluster-wide: the `maxelem` of the ipset
/// that holds them on each node.
pub const MAX_IPS_PER_SET: usize = 1 << 20;

/// The isolation part of a node's desired state.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct IsolationSpec {
    /// The cluster's pod network (K3s `--cluster-cidr`, e.g. `10.42.0.0/16`): traffic with both ends
    /// in it is pod-to-pod traffic.
    pub pod_cidr: Ipv4Cidr,
    /// Networks no pod may reach: the Proxmox API, the coordinator, BMCs. Must not overlap the pod
    /// CIDR. The node's own addresses in them are covered too; the node itself is never restricted.
    pub management_cidrs: Vec<Ipv4Cidr>,
    /// Pods every tenant may talk to, and that may talk to every pod (cluster DNS, ingress).
    pub system_pod_ips: BTreeSet<Ipv4Addr>,
    /// The tenants hosted on this node, each with its pods cluster-wide.
    pub tenants: Vec<TenantIsolation>,
    /// Every node's addresses (as the coordinator sees them, not as nodes claim them). Pods reach
    /// a node address, and any address of their own node, only through `node_services`.
    #[serde(default)]
    pub node_addresses: BTreeSet<Ipv4Addr>,
    /// The only ports of node addresses pods may open connections to (the Kubernetes API on server
    /// nodes, which vCluster's syncer needs; DNS when the host serves it; the kubelet for system
    /// pods only, which the metrics server scrapes). No pod reaches a management address.
    #[serde(default)]
    pub node_services: Vec<NodeService>,
}

/// A port on some node addresses that pods may open connections to.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NodeService {
    /// A short name for people and for the set that holds `addresses` (`[a-z0-9-]`, at most 12).
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// The node addresses that serve it.
    pub addresses: BTreeSet<Ipv4Addr>,
    /// Only system pods may use it (the kubelet's port, for the metrics server).
    #[serde(default)]
    pub system_only: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// Longest [`NodeService::name`].
pub const MAX_SERVICE_NAME: usize = 12;

/// One tenant hosted on the node. (Specs saved before allocations moved to `NodeSpec::tenants`
/// carry an `allocation` here too; it is ignored when they load.)
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TenantIsolation {
    pub tenant: String,
    /// The tenant's pod IPs on every node of the cluster.
    pub pod_ips: BTreeSet<Ipv4Addr>,
}

/// An IPv4 network in CIDR notation, `10.42.0.0/16`. A single address may be written without the
/// prefix and means `/32`. Host bits must be zero, so that every network has one spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IsolationError {
    #[error("{value:?} is not an IPv4 CIDR: {why}")]
    BadCidr { value: String, why: String },
    #[error("the pod CIDR {0} covers every address: use the cluster's pod network, e.g. 10.42.0.0/16")]
    PodCidrTooWide(Ipv4Cidr),
    #[error(
        "management CIDR {management} overlaps the pod CIDR {pod_cidr}: pods could not be told from management \
         hosts; remove it from management_cidrs or correct the pod CIDR"
    )]
    ManagementOverlapsPods { management: Ipv4Cidr, pod_cidr: Ipv4Cidr },
    #[error("management CIDRs {inner} and {outer} overlap: list only {outer}")]
    ManagementOverlap { inner: Ipv4Cidr, outer: Ipv4Cidr },
    #[error("tenant {0:?} is listed twice: merge its pod IPs into one entry")]
    DuplicateTenant(String),
    #[error("tenant name: {0}")]
    TenantName(#[from] NameError),
    #[error(
        "pod IP {ip} is in both tenant {first:?} and tenant {second:?}: an IP belongs to one pod; drop the stale \
         entry (a pod that was deleted and whose IP was reused)"
    )]
    IpInTwoTenants { ip: Ipv4Addr, first: String, second: String },
    #[error("pod IP {ip} is both a system pod and a pod of tenant {tenant:?}: list it in one place only")]
    SystemIpInTenant { ip: Ipv4Addr, tenant: String },
    #[error(
        "pod IP {ip} of {owner} is outside the pod CIDR {pod_cidr}: host-network pods are the node and are not \
         listed; otherwise correct the pod CIDR"
    )]
    IpOutsidePodCidr { ip: Ipv4Addr, owner: String, pod_cidr: Ipv4Cidr },
    #[error("{owner} has {count} pod IPs, more than the {max} one node's firewall set can hold")]
    TooManyIps { owner: String, count: usize, max: usize },
    #[error("node address {ip} is inside the pod CIDR {pod_cidr}: a node's address is never a pod's")]
    NodeAddressInPodCidr { ip: Ipv4Addr, pod_cidr: Ipv4Cidr },
    #[error(
        "node service {name:?}: {why} (names are 1 to 12 of a-z, 0-9 and '-', ports 1 to 65535, addresses \
         among node_addresses)"
    )]
    BadNodeService { name: String, why: String },
}

impl Ipv4Cidr {
    /// `network/prefix`; fails when `prefix > 32` or host bits are set.
    pub fn new(network: Ipv4Addr, prefix: u8) -> Result<Ipv4Cidr, IsolationError> {
        let bad = |why: String| IsolationError::BadCidr { value: format!("{network}/{prefix}"), why };
        if prefix > 32 {
            return Err(bad("the prefix length must be 0 to 32".into()));
        }
        let masked = Ipv4Addr::from(u32::from(network) & mask(prefix));
        if masked != network {
            return Err(bad(format!("host bits are set: write the network address {masked}/{prefix}")));
        }
        Ok(Ipv4Cidr { network, prefix })
    }

    /// The `/32` network of one address.
    pub fn host(address: Ipv4Addr) -> Ipv4Cidr {
        Ipv4Cidr { network: address, prefix: 32 }
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn contains(&self, address: Ipv4Addr) -> bool {
        u32::from(address) & mask(self.prefix) == u32::from(self.network)
    }

    /// True when the two networks share at least one address (one then contains the other).
    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = IsolationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| IsolationError::BadCidr { value: s.to_string(), why: why.to_string() };
        let (address, prefix) = match s.split_once('/') {
            Some((address, prefix)) => {
                let prefix =
                    prefix.parse::<u8>().map_err(|_| bad("the prefix length must be a number from 0 to 32"))?;
                (address, prefix)
            }
            None => (s, 32),
        };
        let network = address.parse::<Ipv4Addr>().map_err(|_| {
            if address.contains(':') {
                bad("IPv6 is not supported yet: list IPv4 networks only")
            } else {
                bad("expected a dotted IPv4 address before the slash, e.g. 10.42.0.0/16")
            }
        })?;
        Ipv4Cidr::new(network, prefix).map_err(|e| match e {
            IsolationError::BadCidr { why, .. } => IsolationError::BadCidr { value: s.to_string(), why },
            other => other,
        })
    }
}

impl Serialize for Ipv4Cidr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl IsolationSpec {
    /// Checks everything the firewall relies on; the error names the value to correct.
    pub fn validate(&self) -> Result<(), IsolationError> {
        if self.pod_cidr.prefix == 0 {
            return Err(IsolationError::PodCidrTooWide(self.pod_cidr));
        }
        for (i, management) in self.management_cidrs.iter().enumerate() {
            if management.overlaps(&self.pod_cidr) {
                return Err(IsolationError::ManagementOverlapsPods {
                    management: *management,
                    pod_cidr: self.pod_cidr,
                });
            }
            for other in &self.management_cidrs[i + 1..] {
                if management.overlaps(other) {
                    let (inner, outer) =
                        if management.prefix >= other.prefix { (*management, *other) } else { (*other, *management) };
                    return Err(IsolationError::ManagementOverlap { inner, outer });
                }
            }
        }
        let check_set = |owner: &str, ips: &BTreeSet<Ipv4Addr>| {
            if ips.len() > MAX_IPS_PER_SET {
                return Err(IsolationError::TooManyIps {
                    owner: owner.to_string(),
                    count: ips.len(),
                    max: MAX_IPS_PER_SET,
                });
            }
            match ips.iter().find(|ip| !self.pod_cidr.contains(**ip)) {
                Some(ip) => {
                    Err(IsolationError::IpOutsidePodCidr { ip: *ip, owner: owner.to_string(), pod_cidr: self.pod_cidr })
                }
                None => Ok(()),
            }
        };
        check_set("the system pods", &self.system_pod_ips)?;
        if let Some(ip) = self.node_addresses.iter().find(|ip| self.pod_cidr.contains(**ip)) {
            return Err(IsolationError::NodeAddressInPodCidr { ip: *ip, pod_cidr: self.pod_cidr });
        }
        let mut service_names = BTreeSet::new();
        for service in &self.node_services {
            let bad = |why: String| IsolationError::BadNodeService { name: service.name.clone(), why };
            let name_ok = !service.name.is_empty()
                && service.name.len() <= MAX_SERVICE_NAME
                && service.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !name_ok {
                return Err(bad("the name is not valid".into()));
            }
            if !service_names.insert(service.name.as_str()) {
                return Err(bad("the name is listed twice".into()));
            }
            if service.port == 0 {
                return Err(bad("port 0".into()));
            }
            if let Some(ip) = service.addresses.iter().find(|ip| !self.node_addresses.contains(ip)) {
                return Err(bad(format!("{ip} is not a node address")));
            }
        }
        let mut owners: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
        let mut names = BTreeSet::new();
        for tenant in &self.tenants {
            validate_tenant_name(&tenant.tenant)?;
            if !names.insert(tenant.tenant.as_str()) {
                return Err(IsolationError::DuplicateTenant(tenant.tenant.clone()));
            }
            check_set(&format!("tenant {:?}", tenant.tenant), &tenant.pod_ips)?;
            for ip in &tenant.pod_ips {
                if self.system_pod_ips.contains(ip) {
                    return Err(IsolationError::SystemIpInTenant { ip: *ip, tenant: tenant.tenant.clone() });
                }
                if let Some(first) = owners.insert(*ip, &tenant.tenant) {
                    return Err(IsolationError::IpInTwoTenants {
                        ip: *ip,
                        first: first.to_string(),
                        second: tenant.tenant.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The entry of `tenant`, if it is hosted on this node.
    pub fn tenant(&self, tenant: &str) -> Option<&TenantIsolation> {
        self.tenants.iter().find(|t| t.tenant == tenant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().unwrap()
    }

    fn tenant(name: &str, ips: &[&str]) -> TenantIsolation {
        TenantIsolation { tenant: name.into(), pod_ips: ips.iter().map(|s| ip(s)).collect() }
    }

    fn spec() -> IsolationSpec {
        IsolationSpec {
            pod_cidr: cidr("10.42.0.0/16"),
            management_cidrs: vec![cidr("192.168.10.0/24"), cidr("172.16.0.5")],
            system_pod_ips: [ip("10.42.0.10")].into(),
            tenants: vec![tenant("acme", &["10.42.0.11", "10.42.1.11"]), tenant("globex", &["10.42.0.12"])],
            node_addresses: [ip("192.168.1.10"), ip("192.168.1.11")].into(),
            node_services: vec![NodeService {
                name: "kube-api".into(),
                protocol: Protocol::Tcp,
                port: 6443,
                addresses: [ip("192.168.1.10")].into(),
                system_only: false,
            }],
        }
    }

    #[test]
    fn cidrs_parse_print_and_match() {
        let c = cidr("10.42.0.0/16");
        assert_eq!(c.to_string(), "10.42.0.0/16");
        assert!(c.contains(ip("10.42.255.1")));
        assert!(!c.contains(ip("10.43.0.1")));
        assert_eq!(cidr("172.16.0.5").to_string(), "172.16.0.5/32");
        assert_eq!(cidr("0.0.0.0/0").prefix(), 0);
        assert!(cidr("0.0.0.0/0").contains(ip("1.2.3.4")));
        assert!(cidr("10.0.0.0/8").overlaps(&c) && c.overlaps(&cidr("10.0.0.0/8")));
        assert!(!c.overlaps(&cidr("10.43.0.0/16")));
    }

    #[test]
    fn bad_cidrs_say_what_to_write() {
        let cases = [
            ("10.42.0.1/16", "host bits are set: write the network address 10.42.0.0/16"),
            ("10.42.0.0/33", "the prefix length must be 0 to 32"),
            ("10.42.0.0/x", "the prefix length must be a number"),
            ("10.42.0/16", "expected a dotted IPv4 address"),
            ("fd00::/64", "IPv6 is not supported yet"),
        ];
        for (input, want) in cases {
            let err = input.parse::<Ipv4Cidr>().unwrap_err().to_string();
            assert!(err.contains(want) && err.contains(input), "{input}: {err}");
        }
    }

    #[test]
    fn json_round_trip_uses_plain_strings() {
        let s = spec();
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(r#""pod_cidr":"10.42.0.0/16""#), "{json}");
        assert!(json.contains(r#""10.42.1.11""#), "{json}");
        assert!(json.contains(r#""protocol":"tcp""#), "{json}");
        let old = r#"{"pod_cidr":"10.42.0.0/16","management_cidrs":[],"system_pod_ips":[],"tenants":[]}"#;
        let old: IsolationSpec = serde_json::from_str(old).unwrap();
        assert!(
            old.node_addresses.is_empty() && old.node_services.is_empty(),
            "specs saved before node addresses load"
        );
        assert_eq!(serde_json::from_str::<IsolationSpec>(&json).unwrap(), s);
        let bad = json.replace("10.42.0.0/16", "10.42.0.1/16");
        let err = serde_json::from_str::<IsolationSpec>(&bad).unwrap_err().to_string();
        assert!(err.contains("write the network address 10.42.0.0/16"), "{err}");
    }

    #[test]
    fn bincode_round_trip() {
        let s = spec();
        let bytes = bincode::serde::encode_to_vec(&s, bincode::config::standard()).unwrap();
        let (back, _): (IsolationSpec, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn validation_names_the_value_to_fix() {
        assert_eq!(spec().validate(), Ok(()));
        let mut cases: Vec<(IsolationSpec, &str)> = Vec::new();
        let mut s = spec();
        s.pod_cidr = cidr("0.0.0.0/0");
        cases.push((s, "covers every address"));
        let mut s = spec();
        s.management_cidrs.push(cidr("10.42.7.0/24"));
        cases.push((s, "management CIDR 10.42.7.0/24 overlaps the pod CIDR 10.42.0.0/16"));
        let mut s = spec();
        s.management_cidrs.push(cidr("192.168.10.7"));
        cases.push((s, "192.168.10.7/32 and 192.168.10.0/24 overlap: list only 192.168.10.0/24"));
        let mut s = spec();
        s.tenants.push(tenant("acme", &[]));
        cases.push((s, "tenant \"acme\" is listed twice"));
        let mut s = spec();
        s.tenants.push(tenant("Bad_Name", &[]));
        cases.push((s, "Bad_Name"));
        let mut s = spec();
        s.tenants.push(tenant("initech", &["10.42.1.11"]));
        cases.push((s, "10.42.1.11 is in both tenant \"acme\" and tenant \"initech\""));
        let mut s = spec();
        s.tenants.push(tenant("initech", &["10.42.0.10"]));
        cases.push((s, "10.42.0.10 is both a system pod and a pod of tenant \"initech\""));
        let mut s = spec();
        s.tenants.push(tenant("initech", &["192.168.10.3"]));
        cases.push((s, "192.168.10.3 of tenant \"initech\" is outside the pod CIDR 10.42.0.0/16"));
        let mut s = spec();
        s.system_pod_ips.insert(ip("10.43.0.10"));
        cases.push((s, "10.43.0.10 of the system pods is outside the pod CIDR"));
        let mut s = spec();
        s.node_addresses.insert(ip("10.42.9.9"));
        cases.push((s, "node address 10.42.9.9 is inside the pod CIDR"));
        let mut s = spec();
        s.node_services[0].addresses.insert(ip("192.168.1.99"));
        cases.push((s, "node service \"kube-api\": 192.168.1.99 is not a node address"));
        let mut s = spec();
        s.node_services.push(s.node_services[0].clone());
        cases.push((s, "the name is listed twice"));
        let mut s = spec();
        s.node_services[0].name = "Kube API".into();
        cases.push((s, "the name is not valid"));
        let mut s = spec();
        s.node_services[0].port = 0;
        cases.push((s, "port 0"));
        for (s, want) in cases {
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains(want), "want {want:?} in {err:?}");
        }
    }

    #[test]
    fn tenant_lookup() {
        let s = spec();
        assert_eq!(s.tenant("globex").map(|t| t.pod_ips.len()), Some(1));
        assert!(s.tenant("initech").is_none());
    }
}

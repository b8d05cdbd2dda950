//! Who owns each pod IP: the map every node's isolation sets are cut from.
//!
//! A node's firewall lets two pods talk when both IPs are in one tenant's set, or one is a system
//! pod. Those sets are cluster-wide, so whoever decides "IP X belongs to tenant Y" decides what
//! every other node lets through. That word is taken from sources a node cannot bend to its gain:
//!
//! - **The host cluster's API**, when the coordinator has one (`[hostcluster] mode = "apply"`): the
//!   Pods it serves (namespace `hx-<tenant>`: that tenant's; `kube-system`: system pods) and each
//!   Node's `spec.podCIDR`. What agents report is not consulted at all. A pod's IP must lie inside
//!   the pod range of the node it is bound to when that node has one, and an IP inside some node's
//!   range is accepted only from pods bound to that node: a kubelet writes its own pods' status, so
//!   a compromised one could otherwise claim addresses elsewhere. Pods on the host network, mirror
//!   pods (which a kubelet creates by itself) and finished pods hold no pod IP and are skipped.
//! - **Each node's own report**, in the modes without an API server: a node speaks only for IPs
//!   inside its own pod range. That range is the Node's `spec.podCIDR` when the API has told us;
//!   otherwise it is pinned from the node's first report that names pods: the block of
//!   [`NODE_POD_PREFIX`] bits (K3s' default `node-cidr-mask-size`) that holds most of its pods,
//!   unless another node holds that block already. A pin is kept (the caller persists it) until the
//!   node is forgotten, so a node cannot move into another's block later, and a pin is never given
//!   to a second node. A dedicated node speaks only for its own tenant. A `kube-system` pod in a
//!   report is a system pod only when a `server` node reports it: a server holds the cluster's
//!   server token and CA keys, so its word is the API's; any other node's `kube-system` pods are
//!   nobody's. Reports of nodes that are Lost, or whose certificate was revoked, count for nothing.
//!
//! Two owners claiming one IP (two tenants, or a tenant and the system pods) drop it from every set:
//! the pod behind it is cut off (fail closed) instead of the coordinator producing a spec that
//! every node would refuse as invalid.
//!
//! Pure: no I/O, no clock. The inventory feeds it ([`PodOwners::report`],
//! [`PodOwners::apply_api`]), asks for the map ([`PodOwners::resolve`]) and recomputes the nodes
//! whose sets changed ([`OwnerMap::changes`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use hexa_shared::isolation::Ipv4Cidr;
use hexa_shared::names::{Pool, tenant_of_namespace};
use hexa_shared::report::PodInfo;

/// Length of the pod range K3s gives each node by default (`--node-cidr-mask-size` 24): the size
/// of the block a node is pinned to when no Node object says its range.
pub const NODE_POD_PREFIX: u8 = 24;

/// The namespace whose pods are system pods (cluster DNS, ingress, metrics).
pub const SYSTEM_NAMESPACE: &str = "kube-system";

/// Whose a pod IP is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Owner {
    /// A system pod: every tenant may talk to it.
    System,
    Tenant(String),
}

impl Owner {
    /// The owner of pods in host namespace `namespace`, if its pods have one.
    pub fn of_namespace(namespace: &str) -> Option<Owner> {
        if namespace == SYSTEM_NAMESPACE {
            return Some(Owner::System);
        }
        tenant_of_namespace(namespace).map(|tenant| Owner::Tenant(tenant.to_string()))
    }
}

/// A pod as the host cluster's API serves it, reduced to what ownership needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiPod {
    pub namespace: String,
    /// `spec.nodeName`: where it is bound.
    pub node: Option<String>,
    /// Its IPv4 `status.podIPs` entry.
    pub ip: Option<Ipv4Addr>,
    /// False for pods that hold no pod IP of their own: on the host network, mirror pods, and pods
    /// that finished (Succeeded or Failed: their IP may already be another pod's).
    pub holds_ip: bool,
}

/// A pod's identity in the API: namespace and name.
pub type PodKey = (String, String);

/// A change the host cluster's watchers saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiChange {
    /// The complete set of pods, after a (re)list.
    PodsListed(Vec<(PodKey, ApiPod)>),
    PodApplied(PodKey, ApiPod),
    PodDeleted(PodKey),
    /// Every node with its IPv4 pod ranges, after a (re)list.
    NodesListed(Vec<(String, Vec<Ipv4Cidr>)>),
    NodeApplied(String, Vec<Ipv4Cidr>),
    NodeDeleted(String),
}

/// Where a node stands in the inventory, as far as its word counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standing {
    pub pool: Pool,
    /// Not Lost and not revoked: its reports count.
    pub live: bool,
}

/// The resolved map: each tenant's IPs and the system pods' IPs, no IP in two places.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnerMap {
    system: BTreeSet<Ipv4Addr>,
    tenants: BTreeMap<String, BTreeSet<Ipv4Addr>>,
    /// IPs with more than one owner: in no set.
    conflicts: BTreeSet<Ipv4Addr>,
    /// Per node, the claims it made that were not taken (outside its range, a kube-system pod
    /// on a node whose word does not make system pods, another tenant on a dedicated node, a
    /// report whose tenant contradicts its namespace). `""` for pods not bound to a node.
    refused: BTreeMap<String, usize>,
}

/// What changed between two maps: the nodes to recompute are those holding one of `tenants`, and
/// every node with an isolation spec when `system` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub system: bool,
    pub tenants: BTreeSet<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        !self.system && self.tenants.is_empty()
    }

    /// Adds `other`'s changes to these.
    pub fn merge(&mut self, other: Changes) {
        self.system |= other.system;
        self.tenants.extend(other.tenants);
    }
}

static NO_IPS: BTreeSet<Ipv4Addr> = BTreeSet::new();

impl OwnerMap {
    pub fn system_ips(&self) -> &BTreeSet<Ipv4Addr> {
        &self.system
    }

    /// `tenant`'s pod IPs cluster-wide (none when it has no pods).
    pub fn tenant_ips(&self, tenant: &str) -> &BTreeSet<Ipv4Addr> {
        self.tenants.get(tenant).unwrap_or(&NO_IPS)
    }

    /// IPs claimed by two owners, which are in no set.
    pub fn conflicts(&self) -> &BTreeSet<Ipv4Addr> {
        &self.conflicts
    }

    /// Claims each node made that were not taken; nodes with none are left out.
    pub fn refused(&self) -> &BTreeMap<String, usize> {
        &self.refused
    }

    pub fn owner_of(&self, ip: Ipv4Addr) -> Option<Owner> {
        if self.system.contains(&ip) {
            return Some(Owner::System);
        }
        self.tenants.iter().find(|(_, ips)| ips.contains(&ip)).map(|(tenant, _)| Owner::Tenant(tenant.clone()))
    }

    /// Which sets differ between `self` and `newer`.
    pub fn changes(&self, newer: &OwnerMap) -> Changes {
        let names: BTreeSet<&String> = self.tenants.keys().chain(newer.tenants.keys()).collect();
        Changes {
            system: self.system != newer.system,
            tenants: names
                .into_iter()
                .filter(|t| self.tenant_ips(t) != newer.tenant_ips(t))
                .map(|t| t.to_string())
                .collect(),
        }
    }
}

/// What a report did to its node's range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pinning {
    /// Nothing: the node has a range already, names no pod IP yet, or the API decides.
    Unchanged,
    /// The node is now pinned to this range.
    Pinned(Ipv4Cidr),
    /// The node's pods fall in `holder`'s range: the node speaks for no pod until that is resolved.
    Taken { block: Ipv4Cidr, holder: String },
}

/// Where pod ownership is taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Reports,
    Api,
}

/// Everything ownership is derived from: the API's pods and nodes, each node's latest reported
/// pods, and the ranges nodes are pinned to.
#[derive(Debug, Clone)]
pub struct PodOwners {
    cluster_cidr: Ipv4Cidr,
    source: Source,
    api_pods: BTreeMap<PodKey, ApiPod>,
    api_nodes: BTreeMap<String, Vec<Ipv4Cidr>>,
    reports: BTreeMap<String, Vec<PodInfo>>,
    pins: BTreeMap<String, Ipv4Cidr>,
}

impl PodOwners {
    /// Ownership from agents' reports within the cluster's pod network `cluster_cidr`, with the
    /// pins kept from earlier runs.
    pub fn new(cluster_cidr: Ipv4Cidr, pins: BTreeMap<String, Ipv4Cidr>) -> PodOwners {
        PodOwners {
            cluster_cidr,
            source: Source::Reports,
            api_pods: BTreeMap::new(),
            api_nodes: BTreeMap::new(),
            reports: BTreeMap::new(),
            pins,
        }
    }

    /// From now on the host cluster's API alone says who owns which pod; reports are ignored.
    pub fn use_api(&mut self) {
        self.source = Source::Api;
        self.reports.clear();
    }

    pub fn uses_api(&self) -> bool {
        self.source == Source::Api
    }

    /// The ranges nodes are pinned to (to persist).
    pub fn pins(&self) -> &BTreeMap<String, Ipv4Cidr> {
        &self.pins
    }

    /// The pod ranges `node` may speak for: its Node's `spec.podCIDR`s when known, else its pin.
    pub fn range_of(&self, node: &str) -> Vec<Ipv4Cidr> {
        match self.api_nodes.get(node) {
            Some(ranges) if !ranges.is_empty() => ranges.clone(),
            _ => self.pins.get(node).copied().into_iter().collect(),
        }
    }

    /// Takes `node`'s latest reported pods, and pins the node to a range when it has none yet
    /// (the caller persists [`PodOwners::pins`] when that happens).
    pub fn report(&mut self, node: &str, pods: &[PodInfo]) -> Pinning {
        if self.source == Source::Api {
            // The API decides; a report is not even kept.
            return Pinning::Unchanged;
        }
        self.reports.insert(node.to_string(), pods.to_vec());
        if !self.range_of(node).is_empty() {
            return Pinning::Unchanged;
        }
        let Some(block) = self.block_for(pods) else { return Pinning::Unchanged };
        let pinned = self.pins.iter().find(|(_, pin)| pin.overlaps(&block)).map(|(holder, _)| holder);
        let listed = || self.api_nodes.iter().find(|(_, rs)| rs.iter().any(|r| r.overlaps(&block))).map(|(n, _)| n);
        if let Some(holder) = pinned.or_else(listed) {
            return Pinning::Taken { block, holder: holder.clone() };
        }
        self.pins.insert(node.to_string(), block);
        Pinning::Pinned(block)
    }

    /// The block holding most of `pods`' IPs inside the cluster's pod network (the lowest on a tie).
    fn block_for(&self, pods: &[PodInfo]) -> Option<Ipv4Cidr> {
        let prefix = NODE_POD_PREFIX.max(self.cluster_cidr.prefix());
        let mut counts: BTreeMap<Ipv4Cidr, usize> = BTreeMap::new();
        for ip in pods.iter().filter_map(|p| p.ip).filter(|ip| self.cluster_cidr.contains(*ip)) {
            *counts.entry(block_of(ip, prefix)).or_default() += 1;
        }
        let most = counts.values().copied().max()?;
        counts.into_iter().find(|(_, n)| *n == most).map(|(block, _)| block)
    }

    /// Drops `node`'s report and its pin: its range is free again. Returns true when it had either.
    pub fn forget(&mut self, node: &str) -> bool {
        let report = self.reports.remove(node).is_some();
        self.pins.remove(node).is_some() || report
    }

    /// Takes a change the host cluster's watchers saw. Returns true when it changed anything.
    pub fn apply_api(&mut self, change: ApiChange) -> bool {
        match change {
            ApiChange::PodsListed(pods) => {
                let pods: BTreeMap<PodKey, ApiPod> = pods.into_iter().collect();
                let changed = pods != self.api_pods;
                self.api_pods = pods;
                changed
            }
            ApiChange::PodApplied(key, pod) => self.api_pods.insert(key, pod.clone()).is_none_or(|old| old != pod),
            ApiChange::PodDeleted(key) => self.api_pods.remove(&key).is_some(),
            ApiChange::NodesListed(nodes) => {
                let nodes: BTreeMap<String, Vec<Ipv4Cidr>> = nodes.into_iter().collect();
                let changed = nodes != self.api_nodes;
                self.api_nodes = nodes;
                changed
            }
            ApiChange::NodeApplied(name, ranges) => {
                self.api_nodes.insert(name, ranges.clone()).is_none_or(|old| old != ranges)
            }
            ApiChange::NodeDeleted(name) => self.api_nodes.remove(&name).is_some(),
        }
    }

    /// The map, with `standing` saying which nodes' reports count and in which pool they are.
    pub fn resolve(&self, standing: &BTreeMap<String, Standing>) -> OwnerMap {
        let mut claims: BTreeMap<Ipv4Addr, BTreeSet<Owner>> = BTreeMap::new();
        let mut map = OwnerMap::default();
        match self.source {
            Source::Api => self.api_claims(&mut claims, &mut map.refused),
            Source::Reports => self.report_claims(standing, &mut claims, &mut map.refused),
        }
        for (ip, owners) in claims {
            let mut owners = owners.into_iter();
            match (owners.next(), owners.next()) {
                (Some(Owner::System), None) => {
                    map.system.insert(ip);
                }
                (Some(Owner::Tenant(tenant)), None) => {
                    map.tenants.entry(tenant).or_default().insert(ip);
                }
                _ => {
                    map.conflicts.insert(ip);
                }
            }
        }
        map
    }

    /// Every node's ranges, API ranges first, then pins of nodes the API gives none.
    fn ranges(&self) -> Vec<(&str, Ipv4Cidr)> {
        let mut ranges: Vec<(&str, Ipv4Cidr)> =
            self.api_nodes.iter().flat_map(|(node, rs)| rs.iter().map(move |r| (node.as_str(), *r))).collect();
        for (node, pin) in &self.pins {
            if self.api_nodes.get(node).is_none_or(|rs| rs.is_empty()) {
                ranges.push((node, *pin));
            }
        }
        ranges
    }

    fn api_claims(&self, claims: &mut BTreeMap<Ipv4Addr, BTreeSet<Owner>>, refused: &mut BTreeMap<String, usize>) {
        let ranges =
            RangeIndex::new(self.api_nodes.iter().flat_map(|(n, rs)| rs.iter().map(move |r| (n.as_str(), *r))));
        for pod in self.api_pods.values() {
            let Some(ip) = pod.ip.filter(|ip| pod.holds_ip && self.cluster_cidr.contains(*ip)) else { continue };
            let Some(owner) = Owner::of_namespace(&pod.namespace) else { continue };
            let holders = ranges.holders(ip);
            let allowed = match pod.node.as_deref() {
                // A node with a range speaks inside it only.
                Some(node) if ranges.has(node) => holders.contains(&node),
                // A node without one (or a pod not bound yet) speaks only outside every range.
                _ => holders.is_empty(),
            };
            if allowed {
                claims.entry(ip).or_default().insert(owner);
            } else {
                *refused.entry(pod.node.clone().unwrap_or_default()).or_default() += 1;
            }
        }
    }

    fn report_claims(
        &self,
        standing: &BTreeMap<String, Standing>,
        claims: &mut BTreeMap<Ipv4Addr, BTreeSet<Owner>>,
        refused: &mut BTreeMap<String, usize>,
    ) {
        let ranges = self.ranges();
        for (node, pods) in &self.reports {
            let Some(standing) = standing.get(node).filter(|s| s.live) else { continue };
            let own: Vec<Ipv4Cidr> = ranges.iter().filter(|(n, _)| n == node).map(|(_, r)| *r).collect();
            for pod in pods {
                let Some(ip) = pod.ip.filter(|ip| self.cluster_cidr.contains(*ip)) else { continue };
                let Some(owner) = Owner::of_namespace(&pod.namespace) else { continue };
                let inside = own.iter().any(|r| r.contains(ip));
                let accepted = match (&owner, &standing.pool) {
                    (Owner::System, pool) => *pool == Pool::Server,
                    (Owner::Tenant(tenant), Pool::Dedicated { tenant: bound }) => tenant == bound,
                    (Owner::Tenant(_), _) => true,
                };
                // The namespace decides; a report whose tenant field says otherwise is not believed.
                let consistent = match (&owner, &pod.tenant) {
                    (Owner::Tenant(tenant), Some(said)) => tenant == said,
                    (Owner::Tenant(_), None) => false,
                    (Owner::System, said) => said.is_none(),
                };
                if inside && accepted && consistent {
                    claims.entry(ip).or_default().insert(owner);
                } else {
                    *refused.entry(node.clone()).or_default() += 1;
                }
            }
        }
    }
}

/// Which node's ranges hold an address, in a lookup per prefix length in use (one, usually)
/// rather than a scan of every node.
struct RangeIndex<'a> {
    by_prefix: BTreeMap<u8, BTreeMap<Ipv4Cidr, Vec<&'a str>>>,
    nodes: BTreeSet<&'a str>,
}

impl<'a> RangeIndex<'a> {
    fn new(ranges: impl Iterator<Item = (&'a str, Ipv4Cidr)>) -> RangeIndex<'a> {
        let mut index = RangeIndex { by_prefix: BTreeMap::new(), nodes: BTreeSet::new() };
        for (node, range) in ranges {
            index.by_prefix.entry(range.prefix()).or_default().entry(range).or_default().push(node);
            index.nodes.insert(node);
        }
        index
    }

    fn has(&self, node: &str) -> bool {
        self.nodes.contains(node)
    }

    /// The nodes whose ranges hold `ip`.
    fn holders(&self, ip: Ipv4Addr) -> Vec<&'a str> {
        let mut holders = Vec::new();
        for (prefix, ranges) in &self.by_prefix {
            if let Some(nodes) = ranges.get(&block_of(ip, *prefix)) {
                holders.extend(nodes.iter().copied());
            }
        }
        holders
    }
}

/// The network of `prefix` bits that holds `ip`.
fn block_of(ip: Ipv4Addr, prefix: u8) -> Ipv4Cidr {
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) };
    Ipv4Cidr::new(Ipv4Addr::from(u32::from(ip) & mask), prefix).unwrap_or_else(|_| Ipv4Cidr::host(ip))
}

#[cfg(test)]
mod tests;

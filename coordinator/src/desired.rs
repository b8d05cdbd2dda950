//! Desired state: what each node's `NodeSpec` should be, as a pure function of the node's record,
//! the tenants placed on it, and what the rest of the fleet says (the first server, the cluster
//! CA, who owns which pod IP). No I/O, no clock, no locks: the inventory calls [`node_spec`] when one
//! of those inputs changes and keeps the result only when its content differs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use hexa_shared::isolation::{Ipv4Cidr, IsolationSpec, NodeService, Protocol, TenantIsolation};
use hexa_shared::k3s::{JoinToken, K3sRole, K3sSpec};
use hexa_shared::names::Pool;
use hexa_shared::spec::{NodeSpec, TenantAllocation};
use hexa_shared::tenant::ShareSize;

use crate::config::{ConfigError, IsolationSettings, K3sSettings};
use crate::pod_owners::OwnerMap;
use crate::store::NodeRecord;

/// What the whole fleet contributes to one node's desired state.
#[derive(Debug, Clone, Copy)]
pub struct Fleet<'a> {
    /// The server that initialises the cluster (the earliest-enrolled `server` node).
    pub first_server: Option<&'a NodeRecord>,
    /// The K3s cluster CA's hash, once the first server has reported it.
    pub cluster_ca_sha256: Option<&'a str>,
    /// Who owns each pod IP (see [`crate::pod_owners`]): never one node's say-so alone.
    pub owners: &'a OwnerMap,
    /// Every node's address, as the coordinator sees it (where its link comes from), and whether
    /// it is a server's.
    pub node_addresses: &'a BTreeMap<Ipv4Addr, bool>,
}

/// Every node's IPv4 address as its link came from, with whether the node is a server.
pub fn node_addresses<'a>(records: impl IntoIterator<Item = &'a NodeRecord>) -> BTreeMap<Ipv4Addr, bool> {
    let mut addresses = BTreeMap::new();
    for record in records {
        if let Some(std::net::IpAddr::V4(ip)) = record.address {
            *addresses.entry(ip).or_insert(false) |= record.pool == Pool::Server;
        }
    }
    addresses
}

/// The server that initialises the cluster among `records`: the earliest-enrolled of the
/// `server` pool (by name when two enrolled in the same second).
pub fn first_server<'a>(records: impl IntoIterator<Item = &'a NodeRecord>) -> Option<&'a NodeRecord> {
    records.into_iter().filter(|r| r.pool == Pool::Server).min_by_key(|r| (r.enrolled_at_unix, r.name.clone()))
}

/// The settings desired state is derived from.
#[derive(Debug, Clone)]
pub struct Plans {
    pub k3s: K3sPlan,
    pub isolation: Option<IsolationPlan>,
}

/// `record`'s desired state at `generation` with `tenants` placed on it.
pub fn node_spec(
    record: &NodeRecord,
    generation: u64,
    tenants: Vec<TenantAllocation>,
    fleet: &Fleet<'_>,
    plans: &Plans,
) -> NodeSpec {
    let k3s = plans.k3s.spec_for(record, fleet);
    let isolation = plans.isolation.as_ref().and_then(|plan| plan.spec_for(&record.pool, &tenants, fleet));
    let mut spec = NodeSpec::build(&record.name, &record.pool, generation, tenants).with_k3s(k3s);
    spec.isolation = isolation;
    spec
}

/// How a tenant's share of a node becomes its whole allocation there. This is the one place an
/// allocation is decided: the node's cgroup governor enforces it as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocationPlan {
    /// `[isolation] pids_per_pod`: a tenant allocated `n` pods on a node may run
    /// `max(n, 1) × pids_per_pod` processes and threads there (a tenant with a share always has
    /// room for one pod), and so may each of its pods.
    pub pids_per_pod: u64,
}

impl AllocationPlan {
    /// `tenant`'s allocation on a node where it has `size` (a share, or a dedicated node's
    /// allocatable).
    pub fn allocation(&self, tenant: &str, size: ShareSize, control_plane: bool) -> TenantAllocation {
        TenantAllocation {
            tenant: tenant.to_string(),
            cpu_millis: size.cpu_millis,
            memory_bytes: size.memory_bytes,
            pods: size.pods,
            pids: Some(u64::from(size.pods.max(1)).saturating_mul(self.pids_per_pod)),
            control_plane,
        }
    }
}

/// What tenant nodes' isolation specs are derived from.
#[derive(Debug, Clone)]
pub struct IsolationPlan {
    pub pod_cidr: Ipv4Cidr,
    /// `[isolation] management_cidrs`, and the coordinator's own addresses (and its Proxmox
    /// endpoint's) that they do not already cover: those are management whatever the config says.
    pub management_cidrs: Vec<Ipv4Cidr>,
    pub kube_api_port: u16,
    /// 0 when the kubelet is closed to system pods too.
    pub kubelet_port: u16,
}

impl IsolationPlan {
    /// Isolation for a node of `pool` holding `tenants`, from the pod ownership map: each
    /// tenant's pod IPs cluster-wide, and the system pods; every node's address, with the
    /// Kubernetes API open on servers' and the kubelet on every node's to system pods. Server
    /// nodes run no tenants and get none.
    pub fn spec_for(&self, pool: &Pool, tenants: &[TenantAllocation], fleet: &Fleet<'_>) -> Option<IsolationSpec> {
        if *pool == Pool::Server {
            return None;
        }
        let in_pod_cidr = |ips: &BTreeSet<Ipv4Addr>| -> BTreeSet<Ipv4Addr> {
            ips.iter().copied().filter(|ip| self.pod_cidr.contains(*ip)).collect()
        };
        let system = in_pod_cidr(fleet.owners.system_ips());
        let mut isolated: Vec<TenantIsolation> = Vec::new();
        for allocation in tenants {
            if isolated.iter().any(|t| t.tenant == allocation.tenant) {
                continue;
            }
            isolated.push(TenantIsolation {
                tenant: allocation.tenant.clone(),
                pod_ips: in_pod_cidr(fleet.owners.tenant_ips(&allocation.tenant)),
            });
        }
        // An address in the pod network is no node's; one can only be there by misconfiguration.
        let nodes: BTreeMap<Ipv4Addr, bool> = fleet
            .node_addresses
            .iter()
            .filter(|(ip, _)| !self.pod_cidr.contains(**ip))
            .map(|(ip, s)| (*ip, *s))
            .collect();
        let mut node_services = vec![NodeService {
            name: "kube-api".into(),
            protocol: Protocol::Tcp,
            port: self.kube_api_port,
            addresses: nodes.iter().filter(|(_, server)| **server).map(|(ip, _)| *ip).collect(),
            system_only: false,
        }];
        if self.kubelet_port != 0 {
            node_services.push(NodeService {
                name: "kubelet".into(),
                protocol: Protocol::Tcp,
                port: self.kubelet_port,
                addresses: nodes.keys().copied().collect(),
                system_only: true,
            });
        }
        Some(IsolationSpec {
            pod_cidr: self.pod_cidr,
            management_cidrs: self.management_cidrs.clone(),
            system_pod_ips: system,
            tenants: isolated,
            node_addresses: nodes.keys().copied().collect(),
            node_services,
        })
    }
}

/// `configured` with each of `always` that no configured network already covers, as single
/// addresses; addresses inside the pod network are left out (they cannot be management).
pub fn with_always_management(configured: &[Ipv4Cidr], always: &[Ipv4Addr], pod_cidr: Ipv4Cidr) -> Vec<Ipv4Cidr> {
    let mut all = configured.to_vec();
    for ip in always {
        if !pod_cidr.contains(*ip) && !all.iter().any(|c| c.contains(*ip)) {
            all.push(Ipv4Cidr::host(*ip));
        }
    }
    all
}

/// State-database keys of the K3s cluster's two secrets. The server secret is what `server` nodes
/// join with and what K3s' `/v1-k3s/server-bootstrap` (the cluster's CA keys) accepts; agents get
/// only the agent secret.
pub const K3S_SERVER_SECRET: &str = "k3s_join_token";
pub const K3S_AGENT_SECRET: &str = "k3s_agent_token";

/// What every node's K3s spec is derived from.
#[derive(Debug, Clone)]
pub struct K3sPlan {
    pub settings: K3sSettings,
    /// The secrets leave the coordinator only inside NodeSpecs, on mTLS links.
    pub server_secret: String,
    pub agent_secret: String,
}

/// K3s' secure token format: `K10<sha256 of the cluster CA>::<user>:<secret>`. A node joining
/// with it checks the server's CA against the hash before it sends the secret.
fn secure_token(ca_sha256: &str, user: &str, secret: &str) -> JoinToken {
    JoinToken::new(format!("K10{ca_sha256}::{user}:{secret}"))
}

impl K3sPlan {
    /// K3s for `record`: the first server initialises the cluster with both secrets; every other
    /// node joins it with a secure token that pins the cluster's CA, servers with the server secret
    /// and agents with the agent secret only. `None` when K3s is not managed, or when the node must
    /// join a cluster whose address or CA is not known yet.
    pub fn spec_for(&self, record: &NodeRecord, fleet: &Fleet<'_>) -> Option<K3sSpec> {
        if !self.settings.manage {
            return None;
        }
        let url = if self.settings.server_url.is_empty() {
            fleet.first_server.and_then(|s| s.address).map(|ip| match ip {
                std::net::IpAddr::V4(v4) => format!("https://{v4}:6443"),
                std::net::IpAddr::V6(v6) => format!("https://[{v6}]:6443"),
            })
        } else {
            Some(self.settings.server_url.clone())
        };
        let server_agent_token = Some(JoinToken::new(self.agent_secret.clone()));
        let (role, token, agent_token) = match (&record.pool, fleet.first_server) {
            (Pool::Server, Some(first)) if first.name == record.name => (
                K3sRole::Server { cluster_init: true, server_url: None },
                JoinToken::new(self.server_secret.clone()),
                server_agent_token,
            ),
            (Pool::Server, _) => (
                K3sRole::Server { cluster_init: false, server_url: Some(url?) },
                secure_token(fleet.cluster_ca_sha256?, "server", &self.server_secret),
                server_agent_token,
            ),
            _ => (
                K3sRole::Agent { server_url: url? },
                secure_token(fleet.cluster_ca_sha256?, "node", &self.agent_secret),
                None,
            ),
        };
        // Registration labels and taints come from the pool only: tenant labels change often and
        // are applied through the API, where changing them restarts nothing.
        let pool_spec = NodeSpec::for_pool(&record.name, &record.pool, 0);
        let mut spec = K3sSpec::new(role);
        spec.token = Some(token);
        spec.agent_token = agent_token;
        spec.version = self.settings.version.clone();
        spec.node_name = Some(record.name.clone());
        spec.node_labels = pool_spec.labels;
        spec.node_taints = pool_spec.taints;
        spec.kubelet_args = self.settings.kubelet_args.clone();
        spec.artifacts = self.settings.artifact_source();
        Some(spec)
    }
}

impl IsolationPlan {
    /// The plan `[isolation]` describes, with `always_management` (the coordinator's own
    /// addresses, its Proxmox endpoint) added to the management networks, or `None` when isolation
    /// is off.
    pub fn from_settings(
        settings: &IsolationSettings,
        always_management: &[Ipv4Addr],
    ) -> Result<Option<IsolationPlan>, ConfigError> {
        if !settings.enabled {
            return Ok(None);
        }
        let pod_cidr = settings.pod_cidr()?;
        Ok(Some(IsolationPlan {
            pod_cidr,
            management_cidrs: with_always_management(&settings.management_cidrs()?, always_management, pod_cidr),
            kube_api_port: settings.kube_api_port,
            kubelet_port: settings.kubelet_port,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Health;

    fn record(name: &str, pool: Pool, enrolled_at_unix: i64) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            pool: pool.clone(),
            hostname: name.into(),
            machine_id: String::new(),
            provider: Default::default(),
            enrolled_at_unix,
            token_id: String::new(),
            cert_serial: String::new(),
            previous_cert_serial: None,
            cert_not_after_unix: 0,
            health: Health::Ready,
            health_since_unix: 0,
            spec: NodeSpec::for_pool(name, &pool, 1),
            cordoned: false,
            node_class: None,
            address: Some(std::net::IpAddr::V4(Ipv4Addr::new(10, 0, 0, 10))),
            revoked_at_unix: None,
        }
    }

    fn plans() -> Plans {
        Plans {
            k3s: K3sPlan { settings: K3sSettings::default(), server_secret: "S".into(), agent_secret: "A".into() },
            isolation: None,
        }
    }

    #[test]
    fn the_same_inputs_give_the_same_spec_and_joiners_wait_for_the_cluster_ca() {
        let first = record("cp-1", Pool::Server, 1);
        let second = record("cp-2", Pool::Server, 2);
        let worker = record("w-1", Pool::Shared, 3);
        let records = [first.clone(), second.clone(), worker.clone()];
        let chosen = first_server(&records);
        assert_eq!(chosen.map(|r| r.name.as_str()), Some("cp-1"));
        let addresses = node_addresses(&records);
        let owners = OwnerMap::default();
        let waiting =
            Fleet { first_server: chosen, cluster_ca_sha256: None, owners: &owners, node_addresses: &addresses };
        let spec = |r: &NodeRecord, fleet: &Fleet<'_>| node_spec(r, 2, Vec::new(), fleet, &plans());
        assert_eq!(spec(&first, &waiting), spec(&first, &waiting), "pure");
        let init = spec(&first, &waiting).k3s.unwrap();
        assert_eq!(init.role, K3sRole::Server { cluster_init: true, server_url: None });
        assert_eq!((init.token.unwrap().expose(), init.agent_token.unwrap().expose()), ("S", "A"));
        assert!(spec(&second, &waiting).k3s.is_none() && spec(&worker, &waiting).k3s.is_none());
        let ca = "f".repeat(64);
        let known = Fleet { cluster_ca_sha256: Some(&ca), ..waiting };
        let join = spec(&second, &known).k3s.unwrap();
        assert_eq!(join.token.unwrap().expose(), format!("K10{ca}::server:S"));
        assert_eq!(join.role.server_url(), Some("https://10.0.0.10:6443"));
        let agent = spec(&worker, &known).k3s.unwrap();
        assert_eq!((agent.token.unwrap().expose(), agent.agent_token), (format!("K10{ca}::node:A").as_str(), None));
    }

    #[test]
    fn an_allocation_is_decided_whole_with_its_pids_cap() {
        let plan = AllocationPlan { pids_per_pod: 321 };
        let size = ShareSize { cpu_millis: 500, memory_bytes: 256 << 20, pods: 3 };
        let allocation = plan.allocation("acme", size, true);
        assert_eq!(
            allocation,
            TenantAllocation {
                tenant: "acme".into(),
                cpu_millis: 500,
                memory_bytes: 256 << 20,
                pods: 3,
                pids: Some(3 * 321),
                control_plane: true,
            }
        );
        let none = plan.allocation("acme", ShareSize { pods: 0, ..size }, false);
        assert_eq!(none.pids, Some(321), "a tenant with a share always has room for one pod");
        let huge = AllocationPlan { pids_per_pod: u64::MAX }.allocation("acme", size, false);
        assert_eq!(huge.pids, Some(u64::MAX));
    }

    #[test]
    fn isolation_names_every_node_address_and_opens_only_the_api_and_the_kubelet() {
        let (server, worker) = (record("cp-1", Pool::Server, 1), record("w-1", Pool::Shared, 2));
        let mut worker = worker;
        worker.address = Some(std::net::IpAddr::V4(Ipv4Addr::new(10, 0, 0, 11)));
        let mut stray = record("w-2", Pool::Shared, 3);
        // An address inside the pod network is no node's: left out, not a spec every node refuses.
        stray.address = Some(std::net::IpAddr::V4(Ipv4Addr::new(10, 42, 3, 3)));
        let addresses = node_addresses([&server, &worker, &stray]);
        let owners = OwnerMap::default();
        let fleet =
            Fleet { first_server: Some(&server), cluster_ca_sha256: None, owners: &owners, node_addresses: &addresses };
        let settings = IsolationSettings { management_cidrs: vec!["192.0.2.0/24".into()], ..Default::default() };
        let coordinator = [Ipv4Addr::new(192, 0, 2, 7), Ipv4Addr::new(198, 51, 100, 4), Ipv4Addr::new(10, 42, 0, 9)];
        let plan = IsolationPlan::from_settings(&settings, &coordinator).unwrap().unwrap();
        let spec = plan.spec_for(&Pool::Shared, &[], &fleet).unwrap();
        spec.validate().unwrap();
        // The coordinator's own address is management whatever the config says; one already
        // covered is not listed twice, one in the pod network cannot be.
        let management: Vec<String> = spec.management_cidrs.iter().map(|c| c.to_string()).collect();
        assert_eq!(management, ["192.0.2.0/24", "198.51.100.4/32"]);
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(spec.node_addresses, [ip("10.0.0.10"), ip("10.0.0.11")].into());
        let services: Vec<(&str, u16, bool, usize)> =
            spec.node_services.iter().map(|s| (s.name.as_str(), s.port, s.system_only, s.addresses.len())).collect();
        assert_eq!(services, [("kube-api", 6443, false, 1), ("kubelet", 10250, true, 2)]);
        assert_eq!(spec.node_services[0].addresses, [ip("10.0.0.10")].into(), "the API on the server only");
        let closed =
            IsolationPlan::from_settings(&IsolationSettings { kubelet_port: 0, ..settings }, &[]).unwrap().unwrap();
        assert_eq!(closed.spec_for(&Pool::Shared, &[], &fleet).unwrap().node_services.len(), 1);
    }
}

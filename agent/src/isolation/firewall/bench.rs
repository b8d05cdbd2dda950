//! The firewall figure: the whole state for many tenants applied as one batch, against the same
//! rules and set members applied with one `iptables`/`ipset` invocation each, in the same run.
//!
//! Each side runs in a fresh network namespace of its own, entered with `setns(2)` by a thread of
//! this process, so that neither side pays for `ip netns exec` and neither finds the other's state.
//! Needs root and the `ip`, `iptables` and `ipset` tools.

use std::fs::File;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hexa_shared::isolation::{Ipv4Cidr, IsolationSpec, MAX_IPS_PER_SET, NodeService, Protocol, TenantIsolation};
use nix::sched::CloneFlags;
use serde::Serialize;

use super::{
    ChainRef, Family, Firewall, FirewallError, LocalPods, Reconciled, Ruleset, SystemFirewall, reconcile, render,
    tokenize,
};

/// The measurements of one run, in milliseconds where a time.
#[derive(Debug, Clone, Serialize)]
pub struct BenchFigures {
    pub tenants: usize,
    pub pod_ips: usize,
    /// iptables rules (jumps included) and ipsets of the state.
    pub rules: usize,
    pub sets: usize,
    /// Building the desired state and rendering the batch, no I/O.
    pub render_ms: f64,
    /// The three steps of the batch apply, and their sum.
    pub batch_ipset_ms: f64,
    pub batch_iptables_ms: f64,
    pub batch_total_ms: f64,
    /// A reconcile right after: read back both tools' state, compare, write nothing.
    pub noop_reconcile_ms: f64,
    /// The same state with one invocation per set, member, chain and rule.
    pub per_rule_ipset_ms: f64,
    pub per_rule_iptables_ms: f64,
    pub per_rule_total_ms: f64,
    pub per_rule_invocations: usize,
    /// `per_rule_total_ms / batch_total_ms`.
    pub speedup: f64,
}

/// Nodes of the synthetic cluster (addresses 192.168.1.1 and up; the first three are servers).
const SYNTHETIC_NODES: u32 = 200;
/// Pods on the benchmarked node itself, each with its own bridge port.
const SYNTHETIC_LOCAL_PODS: usize = 100;

/// The benchmarked node's own pods: the first [`SYNTHETIC_LOCAL_PODS`] of the spec's pod IPs.
pub fn synthetic_local_pods(spec: &IsolationSpec) -> LocalPods {
    let ports = spec
        .tenants
        .iter()
        .flat_map(|t| t.pod_ips.iter().copied())
        .take(SYNTHETIC_LOCAL_PODS)
        .enumerate()
        .map(|(i, ip)| (ip, format!("veth{i:08x}")))
        .collect();
    LocalPods { ports, pod_subnet: "10.0.1.0/24".parse().ok(), ..LocalPods::default() }
}

/// A spec with `tenants` tenants sharing `pod_ips` pod IPs (spread evenly, consecutive addresses in
/// 10.0.0.0/8), four system pods, two management networks, 200 nodes and the Kubernetes API on
/// three of them.
pub fn synthetic_spec(tenants: usize, pod_ips: usize) -> IsolationSpec {
    let base = u32::from(Ipv4Addr::new(10, 0, 1, 0));
    let mut tenant_list: Vec<TenantIsolation> = (0..tenants)
        .map(|i| TenantIsolation { tenant: format!("tenant-{i:04}"), pod_ips: Default::default() })
        .collect();
    if !tenant_list.is_empty() {
        for i in 0..pod_ips {
            let n = tenant_list.len();
            tenant_list[i % n].pod_ips.insert(Ipv4Addr::from(base + i as u32));
        }
    }
    let cidr = |s: &str| s.parse::<Ipv4Cidr>();
    IsolationSpec {
        pod_cidr: cidr("10.0.0.0/8").unwrap_or(Ipv4Cidr::host(Ipv4Addr::new(10, 0, 0, 0))),
        management_cidrs: [cidr("192.168.0.0/24"), cidr("172.16.0.0/12")].into_iter().flatten().collect(),
        system_pod_ips: (2..6).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect(),
        tenants: tenant_list,
        node_addresses: (1..=SYNTHETIC_NODES)
            .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(192, 168, 1, 0)) + i))
            .collect(),
        node_services: vec![NodeService {
            name: "kube-api".into(),
            protocol: Protocol::Tcp,
            port: 6443,
            addresses: (1..=3).map(|i| Ipv4Addr::new(192, 168, 1, i)).collect(),
            system_only: false,
        }],
    }
}

/// A network namespace that exists while this value lives.
struct Netns(String);

impl Netns {
    fn create() -> Result<Netns, FirewallError> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = format!("hxbench{}n{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst));
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .map_err(|e| FirewallError::Netns(format!("cannot run `ip netns add {name}`: {e} (install iproute2)")))?;
        if !status.success() {
            return Err(FirewallError::Netns(format!("`ip netns add {name}` failed ({status}): run as root")));
        }
        Ok(Netns(name))
    }

    /// Runs `work` on a thread that has entered this namespace; commands it spawns run there too.
    fn run<T: Send>(&self, work: impl FnOnce() -> Result<T, FirewallError> + Send) -> Result<T, FirewallError> {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let handle =
                        File::open(&path).map_err(|e| FirewallError::Netns(format!("cannot open {path}: {e}")))?;
                    nix::sched::setns(&handle, CloneFlags::CLONE_NEWNET)
                        .map_err(|e| FirewallError::Netns(format!("cannot enter {path}: {e}")))?;
                    work()
                })
                .join()
                .unwrap_or_else(|_| Err(FirewallError::Netns("the benchmark thread panicked".into())))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Applies `tenants` tenants with `pod_ips` pod IPs as one batch in a fresh namespace, then the same
/// state one invocation at a time in another, checks that both namespaces end in exactly the desired
/// state, and returns the times. The figure is `bench_batch_vs_per_rule(500, 20_000)`.
pub fn bench_batch_vs_per_rule(tenants: usize, pod_ips: usize) -> Result<BenchFigures, FirewallError> {
    let spec = synthetic_spec(tenants, pod_ips);
    let started = Instant::now();
    let desired = Ruleset::desired(&spec, &synthetic_local_pods(&spec))?;
    let batch = render(&desired);
    let render_time = started.elapsed();

    let batch_ns = Netns::create()?;
    let (steps, total, noop) = batch_ns.run(|| {
        let firewall = SystemFirewall::new();
        let started = Instant::now();
        let steps = firewall.apply_timed(&batch)?;
        let total = started.elapsed();
        let started = Instant::now();
        let outcome = reconcile(&firewall, &desired)?;
        let noop = started.elapsed();
        if outcome != Reconciled::Unchanged {
            return Err(FirewallError::NotConverged(super::drift(&desired, &firewall.current()?)));
        }
        Ok((steps, total, noop))
    })?;
    drop(batch_ns);

    let per_rule_ns = Netns::create()?;
    let (ipset_time, iptables_time, invocations) = per_rule_ns.run(|| {
        let firewall = SystemFirewall::new();
        let iptables = firewall.iptables_binary().to_string();
        let ip6tables = firewall.ip6tables_binary().to_string();
        let binary = |chain: &ChainRef| match chain.family {
            Family::V4 => iptables.clone(),
            Family::V6 => ip6tables.clone(),
        };
        let mut invocations = 0;
        let started = Instant::now();
        for (name, set) in &desired.sets {
            let max = MAX_IPS_PER_SET.to_string();
            let mut create = vec!["create", name.as_str()];
            create.extend(set.kind.split_whitespace());
            create.extend(["hashsize", "1024", "maxelem", &max]);
            firewall.run("ipset", &create, None)?;
            invocations += 1;
            for member in &set.members {
                firewall.run("ipset", &["add", name, &member.to_string()], None)?;
                invocations += 1;
            }
        }
        let ipset_time = started.elapsed();
        let started = Instant::now();
        for chain in desired.chains.keys() {
            firewall.run(&binary(chain), &["-w", "-t", chain.table.name(), "-N", &chain.name], None)?;
            invocations += 1;
        }
        for (chain, rules) in &desired.chains {
            for rule in rules {
                let mut args = ["-w", "-t", chain.table.name(), "-A", &chain.name].map(String::from).to_vec();
                args.extend(tokenize(rule));
                firewall.run(&binary(chain), &args.iter().map(String::as_str).collect::<Vec<_>>(), None)?;
                invocations += 1;
            }
        }
        for jump in &desired.jumps {
            let position = (jump.position + 1).to_string();
            let mut args =
                ["-w", "-t", jump.chain.table.name(), "-I", &jump.chain.name, &position].map(String::from).to_vec();
            args.extend(tokenize(&jump.rule));
            firewall.run(&binary(&jump.chain), &args.iter().map(String::as_str).collect::<Vec<_>>(), None)?;
            invocations += 1;
        }
        let iptables_time = started.elapsed();
        if reconcile(&firewall, &desired)? != Reconciled::Unchanged {
            return Err(FirewallError::Netns("the one-by-one baseline did not build the same state".into()));
        }
        Ok((ipset_time, iptables_time, invocations))
    })?;
    drop(per_rule_ns);

    let per_rule_total = ipset_time + iptables_time;
    Ok(BenchFigures {
        tenants,
        pod_ips,
        rules: desired.rule_count(),
        sets: desired.sets.len(),
        render_ms: ms(render_time),
        batch_ipset_ms: ms(steps.ipset_prepare + steps.ipset_cleanup),
        batch_iptables_ms: ms(steps.iptables + steps.ip6tables),
        batch_total_ms: ms(total),
        noop_reconcile_ms: ms(noop),
        per_rule_ipset_ms: ms(ipset_time),
        per_rule_iptables_ms: ms(iptables_time),
        per_rule_total_ms: ms(per_rule_total),
        per_rule_invocations: invocations,
        speedup: per_rule_total.as_secs_f64() / total.as_secs_f64().max(1e-9),
    })
}

//! The Hexabase node agent: enrolls the node with the coordinator, keeps a mutual-TLS QUIC link to
//! it, reports the node's capacity every interval and applies the desired state it receives.
//!
//! - [`link`]: the session with the coordinator (connect, hello, exchange, certificate renewal);
//! - [`node`]: the node supervisor, which outlives sessions: the spec queue and its retries, and the
//!   periodic jobs (K3s observation, pod listing, cgroup governor, firewall drift check);
//! - [`apply`]: applying one spec; [`k3s`], [`isolation`] and [`cgroup`] the parts it touches;
//! - [`collector`] and [`pods`]: what the reports carry; [`enroll`], [`state`], [`config`];
//! - [`backoff`] and [`error`]: reconnect delays and the agent's top-level error.

pub mod apply;
pub mod backoff;
pub mod cgroup;
pub mod collector;
pub mod config;
pub mod enroll;
pub mod error;
pub mod isolation;
pub mod k3s;
pub mod link;
pub mod node;
pub mod pods;
#[cfg(test)]
mod printed;
pub mod state;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::Rng;
use tokio::sync::watch;
use tracing::warn;

use hexa_shared::pki::CaHash;
use hexa_shared::report::Resources;
use hexa_shared::service::ServiceManager;
use hexa_shared::spec::NodeSpec;

use crate::collector::{Collector, CollectorSettings};
use crate::config::AgentConfig;
use crate::enroll::NodeFacts;
use crate::state::StateDir;

pub use crate::error::{AgentError, ConfigError, ConnectError};

/// The node as the agent touches it: where the collector reads it from, the filesystem root K3s
/// is installed under, and the service manager. Tests point these at temporary trees and fakes.
#[derive(Debug, Clone)]
pub struct Host {
    pub proc_root: PathBuf,
    pub cgroup_root: PathBuf,
    /// Where sysfs is (the SMBIOS uuid of a Proxmox VM is read from it).
    pub sys_root: PathBuf,
    pub root: PathBuf,
    pub systemd: Arc<dyn k3s::Systemd>,
    pub readiness: Arc<dyn k3s::NodeReadiness>,
    pub firewall: apply::SharedFirewall,
    pub pods: Arc<dyn pods::PodSource>,
    /// This node's pods' bridge ports (for the firewall's anti-spoofing rules).
    pub local_pods: Arc<dyn isolation::local_pods::LocalPodSource>,
    /// The service manager, told when isolation is in force (READY), what the agent is doing
    /// (STATUS) and that the node supervisor's loop still turns (WATCHDOG).
    pub service: Arc<ServiceManager>,
}

impl Default for Host {
    fn default() -> Self {
        Host {
            proc_root: PathBuf::from("/proc"),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            sys_root: PathBuf::from("/sys"),
            root: PathBuf::from("/"),
            systemd: Arc::new(k3s::Systemctl::default()),
            readiness: Arc::new(k3s::KubectlReadiness::under(Path::new("/"))),
            firewall: Arc::new(isolation::firewall::SystemFirewall::new()),
            pods: Arc::new(pods::KubectlPodSource::under(Path::new("/"))),
            local_pods: Arc::new(isolation::local_pods::CniResults::new(
                isolation::local_pods::DEFAULT_CNI_RESULTS_DIR,
                isolation::firewall::DEFAULT_BRIDGE,
            )),
            service: ServiceManager::none(),
        }
    }
}

impl Host {
    /// The production host, with the pod network `config` describes under `root`.
    pub fn for_config(config: &AgentConfig) -> Host {
        let host = Host::default();
        Host { local_pods: Host::local_pods_under(config, &host.root), ..host }
    }

    /// The CNI results of `config`, read below `root`.
    pub fn local_pods_under(config: &AgentConfig, root: &Path) -> Arc<dyn isolation::local_pods::LocalPodSource> {
        let dir = &config.isolation.cni_results_dir;
        Arc::new(isolation::local_pods::CniResults::new(
            root.join(dir.strip_prefix("/").unwrap_or(dir)),
            &config.isolation.pod_bridge,
        ))
    }

    /// The applier for this host, keeping applied specs in `state`.
    pub fn applier(&self, state: StateDir) -> Result<apply::Applier, AgentError> {
        let arch = k3s::Arch::of_this_machine().map_err(ConfigError::Installer)?;
        let fetcher = k3s::Fetcher::new(arch, k3s::FetchPolicy::default()).map_err(ConfigError::Installer)?;
        Ok(apply::Applier {
            state,
            root: self.root.clone(),
            systemd: self.systemd.clone(),
            readiness: self.readiness.clone(),
            fetcher: Arc::new(fetcher),
            firewall: self.firewall.clone(),
            local_pods: self.local_pods.clone(),
            displacements: Default::default(),
            figures: Default::default(),
        })
    }
}

/// What keeps tenants apart from the moment the agent starts, before any connection is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartupIsolation {
    /// The last applied spec's isolation (or its last good copy's) is in force again.
    Spec { generation: u64 },
    /// No spec could be read, and the baseline that keeps pods apart is in force.
    Baseline,
    /// Nothing is in force yet: the first spec applied puts isolation in place.
    Nothing,
}

/// Enforces, before anything else, what the node has on disk, and says what is in force now: the
/// last applied spec's isolation, or, on a node whose spec and its copy are both damaged
/// (`baseline` is its pod CIDR), the baseline that keeps pods apart. The agent tells systemd it is
/// ready only once one of them is, so that K3s (ordered after the agent) never runs pods on a node
/// without isolation.
pub async fn enforce_at_start(
    applier: &apply::Applier,
    applied: Option<&NodeSpec>,
    baseline: Option<hexa_shared::isolation::Ipv4Cidr>,
    service: &ServiceManager,
) -> StartupIsolation {
    let Some(spec) = applied else {
        let Some(pod_cidr) = baseline else { return StartupIsolation::Nothing };
        service.status(&format!("no readable spec: enforcing the baseline isolation for {pod_cidr}"));
        return match applier.enforce_baseline(pod_cidr).await {
            Ok(()) => {
                warn!(%pod_cidr, "no readable spec: baseline isolation (pods kept apart) enforced");
                StartupIsolation::Baseline
            }
            Err(e) => {
                warn!(error = %e, "cannot enforce the baseline isolation");
                service.status(&format!("cannot enforce the baseline isolation for {pod_cidr}: {e}"));
                StartupIsolation::Nothing
            }
        };
    };
    if spec.isolation.is_none() {
        // A spec without isolation asks for none: applied as it is, nothing is missing.
        return StartupIsolation::Spec { generation: spec.generation };
    }
    service.status(&format!("enforcing the last applied isolation (generation {})", spec.generation));
    match applier.enforce_isolation(spec).await {
        Ok(()) => {
            tracing::info!(generation = spec.generation, "last applied isolation enforced");
            StartupIsolation::Spec { generation: spec.generation }
        }
        Err(e) => {
            warn!(generation = spec.generation, error = %e, "cannot enforce the last applied isolation");
            service.status(&format!(
                "cannot enforce the last applied isolation (generation {}): {e}; retrying",
                spec.generation
            ));
            StartupIsolation::Nothing
        }
    }
}

/// Every address the coordinator addresses resolve to (a name may stand for several), in order,
/// each once.
async fn resolve(addresses: &[&str]) -> Result<Vec<SocketAddr>, AgentError> {
    let mut resolved: Vec<SocketAddr> = Vec::new();
    for address in addresses {
        let found: Vec<SocketAddr> = tokio::net::lookup_host(address)
            .await
            .map_err(|error| ConfigError::Address { address: address.to_string(), error })?
            .collect();
        if found.is_empty() {
            return Err(ConfigError::Unresolved { address: address.to_string() }.into());
        }
        for addr in found {
            if !resolved.contains(&addr) {
                resolved.push(addr);
            }
        }
    }
    if resolved.is_empty() {
        return Err(ConfigError::Unresolved { address: addresses.join(",") }.into());
    }
    Ok(resolved)
}

/// Runs the agent until `shutdown` turns true.
pub async fn run(config: AgentConfig, host: Host, mut shutdown: watch::Receiver<bool>) -> Result<(), AgentError> {
    let state = StateDir::open(&config.state_dir)?;
    let baseline_pod_cidr = config.isolation.baseline_pod_cidr()?;
    let addrs = resolve(&config.coordinator_addresses()).await?;
    let mut addr = addrs[0];
    let any = if addr.is_ipv6() { IpAddr::V6(Ipv6Addr::UNSPECIFIED) } else { IpAddr::V4(Ipv4Addr::UNSPECIFIED) };
    let bind = SocketAddr::new(any, 0);
    let endpoint = quinn::Endpoint::client(bind).map_err(AgentError::Socket)?;

    // Fail-static: whatever the coordinator last asked for is enforced again before anything else
    // (the node supervisor then re-applies the whole spec).
    let applied = state.load_spec()?;
    let applier = host.applier(state.clone())?;
    let baseline = state.spec_is_lost().then_some(baseline_pod_cidr);
    let in_force = enforce_at_start(&applier, applied.as_ref(), baseline, &host.service).await;
    match in_force {
        StartupIsolation::Spec { generation } => host.service.ready(&format!(
            "isolation of generation {generation} in force; connecting to the coordinator at {}",
            config.coordinator
        )),
        StartupIsolation::Baseline => host.service.ready(&format!(
            "no readable spec: baseline isolation (pods kept apart) in force; connecting to the coordinator at {}",
            config.coordinator
        )),
        // READY comes from the supervisor once its first apply has put isolation in force.
        StartupIsolation::Nothing => host.service.status(&format!(
            "no isolation to enforce yet: waiting for a spec from the coordinator at {}",
            config.coordinator
        )),
    }

    if !state.is_enrolled() {
        let token = config.bootstrap_token().map_err(ConfigError::TokenFile)?;
        if token.is_empty() || config.ca_hash.is_empty() {
            return Err(ConfigError::NotEnrolled { state_dir: config.state_dir.clone() }.into());
        }
        let pin: CaHash = config.ca_hash.parse()?;
        let mut facts = NodeFacts::of_this_machine(&config.node_name);
        facts.provider = enroll::provider_identity(&host.sys_root, config.proxmox_vmid)?;
        host.service.status(&format!("enrolling with the coordinator at {}", config.coordinator));
        let mut attempt = 0;
        let mut redirected = false;
        loop {
            match enroll::enroll(&endpoint, addr, &token, pin, &facts, &state).await {
                Ok(_) => break,
                // A refusal is final: retrying a used or wrong token cannot succeed.
                Err(e @ (AgentError::Refused(_) | AgentError::State(_) | AgentError::Crypto(_))) => return Err(e),
                // Sent to the leader: at once, the first time since the last failure.
                Err(AgentError::NotLeader { leader: Some(leader), .. })
                    if !std::mem::replace(&mut redirected, true) =>
                {
                    match resolve(&[leader.as_str()]).await {
                        Ok(found) => {
                            tracing::info!(%leader, "the coordinator follows another; enrolling with the leader");
                            addr = found[0];
                            continue;
                        }
                        Err(e) => warn!(%leader, error = %e, "cannot resolve the leader's address"),
                    }
                }
                Err(e) => {
                    redirected = false;
                    let delay = backoff::backoff_delay(attempt, rand::rng().random::<f64>());
                    warn!(error = %e, coordinator = %addr, retry_in_ms = delay.as_millis() as u64, "enrollment failed");
                    // The next coordinator address, if there are several: the one that failed
                    // may be a follower, or gone.
                    addr = addrs[(attempt as usize + 1) % addrs.len()];
                    host.service.status(&format!("enrollment with {} failed ({e}); retrying", config.coordinator));
                    attempt += 1;
                    // This loop is the one that would hang before the supervisor runs: it feeds
                    // the watchdog while it waits.
                    let until = tokio::time::Instant::now() + delay;
                    loop {
                        host.service.ping();
                        let wake = host.service.next_ping().map_or(until, |at| until.min(at.into()));
                        tokio::select! {
                            _ = tokio::time::sleep_until(wake) => if wake >= until { break },
                            _ = shutdown.changed() => return Ok(()),
                        }
                    }
                }
            }
        }
    }

    let collector = Collector::new(CollectorSettings {
        proc_root: host.proc_root.clone(),
        cgroup_root: host.cgroup_root.clone(),
        ephemeral_path: config.ephemeral_path.clone(),
        reserved: Resources {
            cpu_millis: config.reserved.cpu_millis,
            memory_bytes: config.reserved.memory_bytes,
            ephemeral_bytes: config.reserved.ephemeral_bytes,
            pods: 0,
        },
        eviction_memory_bytes: config.eviction_memory_bytes,
        max_pods: config.max_pods,
    });
    // The supervisor outlives every session: it keeps enforcing while the link is down.
    let parts = node::NodeParts {
        applier,
        collector,
        pod_source: host.pods.clone(),
        cgroup_root: host.cgroup_root.clone(),
        governor: isolation::cgroup::GovernorSettings {
            policy: isolation::cgroup::PolicySettings {
                unknown_tenant: config.isolation.unknown_tenant,
                ..Default::default()
            },
            ..Default::default()
        },
    };
    let node = node::Supervisor::spawn(parts, applied, node::Periods::default(), host.service.clone());
    let mut link = link::Link::new(endpoint.clone(), addrs, state, node)
        .notifying(host.service.clone())
        .with_k3s_root(host.root.clone());
    let result = link.run(shutdown).await;
    endpoint.close(hexa_shared::proto::close_code::DONE.into(), b"agent stopping");
    // Let the close frame leave before the socket goes.
    let _ = tokio::time::timeout(std::time::Duration::from_millis(200), endpoint.wait_idle()).await;
    result
}

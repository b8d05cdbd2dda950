//! The Hexabase node agent: enrolls the node with the coordinator, keeps a mutual-TLS QUIC link to
//! it, reports the node's capacity every interval and applies the desired state it receives.

pub mod apply;
pub mod collector;
pub mod config;
pub mod enroll;
pub mod isolation;
pub mod k3s;
pub mod link;
pub mod pods;
pub mod state;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::Rng;
use tokio::sync::watch;
use tracing::warn;

use hexa_shared::pki::{CaHash, PkiError};
use hexa_shared::proto::Refusal;
use hexa_shared::report::Resources;
use hexa_shared::wire::FrameError;

use crate::collector::{Collector, CollectorSettings};
use crate::config::AgentConfig;
use crate::enroll::NodeFacts;
use crate::state::{StateDir, StateError};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("cannot reach the coordinator: {0}")]
    Connect(String),
    #[error("protocol error: {0}")]
    Frame(#[from] FrameError),
    #[error("the coordinator refused this node: {0}")]
    Refused(Refusal),
    #[error("key generation: {0}")]
    Crypto(String),
    #[error("cannot open a UDP socket: {0}")]
    Socket(std::io::Error),
}

/// The node as the agent touches it: where the collector reads it from, the filesystem root K3s
/// is installed under, and the service manager. Tests point these at temporary trees and fakes.
#[derive(Debug, Clone)]
pub struct Host {
    pub proc_root: PathBuf,
    pub cgroup_root: PathBuf,
    pub root: PathBuf,
    pub systemd: Arc<dyn k3s::Systemd>,
    pub readiness: Arc<dyn k3s::NodeReadiness>,
    pub firewall: apply::SharedFirewall,
    pub pods: Arc<dyn pods::PodSource>,
}

impl Default for Host {
    fn default() -> Self {
        Host {
            proc_root: PathBuf::from("/proc"),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            root: PathBuf::from("/"),
            systemd: Arc::new(k3s::Systemctl::default()),
            readiness: Arc::new(k3s::KubectlReadiness::under(Path::new("/"))),
            firewall: Arc::new(isolation::firewall::SystemFirewall::new()),
            pods: Arc::new(pods::KubectlPodSource::under(Path::new("/"))),
        }
    }
}

impl Host {
    /// The applier for this host, keeping applied specs in `state`.
    pub fn applier(&self, state: StateDir) -> Result<apply::Applier, AgentError> {
        let arch = k3s::Arch::of_this_machine().map_err(|e| AgentError::Config(e.to_string()))?;
        let fetcher =
            k3s::Fetcher::new(arch, k3s::FetchPolicy::default()).map_err(|e| AgentError::Config(e.to_string()))?;
        Ok(apply::Applier {
            state,
            root: self.root.clone(),
            systemd: self.systemd.clone(),
            readiness: self.readiness.clone(),
            fetcher: Arc::new(fetcher),
            firewall: self.firewall.clone(),
        })
    }
}

async fn resolve(address: &str) -> Result<SocketAddr, AgentError> {
    let mut addrs = tokio::net::lookup_host(address)
        .await
        .map_err(|e| AgentError::Config(format!("coordinator address {address:?}: {e} (expected HOST:PORT)")))?;
    addrs.next().ok_or_else(|| AgentError::Config(format!("coordinator address {address:?} resolves to nothing")))
}

/// Runs the agent until `shutdown` turns true.
pub async fn run(config: AgentConfig, host: Host, mut shutdown: watch::Receiver<bool>) -> Result<(), AgentError> {
    let state = StateDir::open(&config.state_dir)?;
    let addr = resolve(&config.coordinator).await?;
    let bind: SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
        .parse()
        .map_err(|_| AgentError::Config("unreachable: literal bind address".into()))?;
    let endpoint = quinn::Endpoint::client(bind).map_err(AgentError::Socket)?;

    // Fail-static: whatever the coordinator last asked for is enforced again before anything else
    // (the link starts by re-applying it).
    let applied = state.load_spec()?;
    let applier = host.applier(state.clone())?;
    if let Some(spec) = &applied {
        // Fail-static: isolation is back in force before the first connection is even tried.
        match applier.enforce_isolation(spec).await {
            Ok(()) => tracing::info!(generation = spec.generation, "last applied isolation enforced"),
            Err(e) => warn!(generation = spec.generation, error = %e, "cannot enforce the last applied isolation"),
        }
    }

    if !state.is_enrolled() {
        let token = config.bootstrap_token().map_err(|e| AgentError::Config(e.to_string()))?;
        if token.is_empty() || config.ca_hash.is_empty() {
            return Err(AgentError::Config(format!(
                "this node is not enrolled (no certificate in {}) and no bootstrap token and CA hash were given: \
                 pass --token-file (or --token) and --ca-hash (from `hexactl token create` and the coordinator's \
                 start-up output)",
                config.state_dir.display()
            )));
        }
        let pin: CaHash = config.ca_hash.parse()?;
        let facts = NodeFacts::of_this_machine(&config.node_name);
        let mut attempt = 0;
        loop {
            match enroll::enroll(&endpoint, addr, &token, pin, &facts, &state).await {
                Ok(_) => break,
                // A refusal is final: retrying a used or wrong token cannot succeed.
                Err(e @ (AgentError::Refused(_) | AgentError::State(_) | AgentError::Crypto(_))) => return Err(e),
                Err(e) => {
                    let delay = link::backoff_delay(attempt, rand::rng().random::<f64>());
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "enrollment failed");
                    attempt += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => return Ok(()),
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
    let mut link = link::Link::new(endpoint.clone(), addr, state, collector, applier, applied, &host);
    let result = link.run(shutdown).await;
    endpoint.close(hexa_shared::proto::close_code::DONE.into(), b"agent stopping");
    // Let the close frame leave before the socket goes.
    let _ = tokio::time::timeout(std::time::Duration::from_millis(200), endpoint.wait_idle()).await;
    result
}

//! Applying a `NodeSpec` to this node. The same [`Applier`] serves the link (every spec the
//! coordinator pushes), agent start-up (re-enforcing the last spec) and `hexa-agent apply`.
//!
//! A spec is checked, then its K3s part is applied (install, upgrade, reconfigure or uninstall,
//! doing nothing when the node already matches), and only then is it recorded as the node's
//! applied state: a spec that failed is not claimed as applied.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hexa_shared::isolation::{Ipv4Cidr, IsolationSpec};
use hexa_shared::k3s::K3sState;
use hexa_shared::names::{NameError, validate_node_name};
use hexa_shared::spec::NodeSpec;

use crate::isolation::figures::IsolationCounters;
use crate::isolation::firewall::{FirewallError, Reconciled, Ruleset, reconcile};
use crate::isolation::local_pods::LocalPodSource;
use crate::k3s::{self, Fetcher, K3sError, NodeReadiness, Systemd};
use crate::state::{StateDir, StateError};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("spec generation 0 is not valid: generations start at 1")]
    ZeroGeneration,
    #[error("spec names node {0:?}: {1}")]
    BadNodeName(String, NameError),
    #[error("label {key:?}={value:?} is not a valid Kubernetes label")]
    BadLabel { key: String, value: String },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("k3s: {0}")]
    K3s(K3sError),
    #[error("firewall: {0}")]
    Firewall(FirewallError),
    #[error("firewall task failed: {0}")]
    Task(tokio::task::JoinError),
}

// The K3s and firewall errors are named in the message, so they are not also the error's `source`:
// a printed chain names each cause once.
impl From<K3sError> for ApplyError {
    fn from(error: K3sError) -> Self {
        ApplyError::K3s(error)
    }
}

impl From<FirewallError> for ApplyError {
    fn from(error: FirewallError) -> Self {
        ApplyError::Firewall(error)
    }
}

/// A firewall the agent can share between its tasks.
pub trait NodeFirewall: crate::isolation::firewall::Firewall + Send + Sync + std::fmt::Debug {}
impl<F: crate::isolation::firewall::Firewall + Send + Sync + std::fmt::Debug> NodeFirewall for F {}

/// The firewall seam as the agent holds it.
pub type SharedFirewall = Arc<dyn NodeFirewall>;

/// Everything applying a spec touches on this node.
#[derive(Debug, Clone)]
pub struct Applier {
    pub state: StateDir,
    /// Filesystem root K3s is installed under (`/` in production; a temp dir in tests).
    pub root: PathBuf,
    pub systemd: Arc<dyn Systemd>,
    pub readiness: Arc<dyn NodeReadiness>,
    pub fetcher: Arc<Fetcher>,
    pub firewall: SharedFirewall,
    /// This node's pods' bridge ports, read at every enforcement.
    pub local_pods: Arc<dyn LocalPodSource>,
    /// Enforcements that only had to put our jumps back before another program's rules.
    pub displacements: Arc<AtomicU64>,
    /// What enforcing isolation has cost and how often it was put right, for the reports.
    pub figures: Arc<IsolationCounters>,
}

impl Applier {
    /// Checks `spec`, makes the node match it, and records it as applied. Isolation comes first:
    /// it is fast, and nothing else should run on a node before its tenants are kept apart.
    pub async fn apply(&self, spec: &NodeSpec) -> Result<(), ApplyError> {
        check(spec)?;
        self.enforce_isolation(spec).await?;
        if let Some(k3s_spec) = &spec.k3s {
            let outcome = k3s::apply(&self.root, k3s_spec, self.systemd.as_ref(), &self.fetcher).await?;
            tracing::info!(generation = spec.generation, change = ?outcome.change, "k3s applied");
        }
        record(&self.state, spec)
    }

    /// Brings the firewall in line with `spec`'s isolation (writing nothing when it already is).
    /// Also run on a timer, to undo hand-made drift, and at start-up before any connection.
    pub async fn enforce_isolation(&self, spec: &NodeSpec) -> Result<(), ApplyError> {
        let Some(isolation) = spec.isolation.clone() else { return Ok(()) };
        self.enforce(isolation, spec.generation).await
    }

    /// Isolation when the node's last spec is lost: every pod-to-pod connection in `pod_cidr` and
    /// every pod connection to the node dropped, each pod held to its own source address, until
    /// the coordinator sends a spec.
    pub async fn enforce_baseline(&self, pod_cidr: Ipv4Cidr) -> Result<(), ApplyError> {
        let baseline = IsolationSpec {
            pod_cidr,
            management_cidrs: Vec::new(),
            system_pod_ips: Default::default(),
            tenants: Vec::new(),
            node_addresses: Default::default(),
            node_services: Vec::new(),
        };
        self.enforce(baseline, 0).await
    }

    /// Reconciles the firewall to `isolation` with this node's own pods, off the runtime's threads,
    /// counting a reconcile that only had to put our rules back as a displacement, and what each
    /// reconcile took in [`Applier::figures`].
    async fn enforce(&self, isolation: IsolationSpec, generation: u64) -> Result<(), ApplyError> {
        let firewall = self.firewall.clone();
        let local_pods = self.local_pods.clone();
        let figures = self.figures.clone();
        let (outcome, repaired) = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let local = local_pods.local_pods();
            let desired = Ruleset::desired(&isolation, &local)?;
            let outcome = reconcile(firewall.as_ref(), &desired);
            let repaired = figures.firewall_reconciled(&desired, outcome.as_ref().ok(), started.elapsed());
            outcome.map(|outcome| (outcome, repaired))
        })
        .await
        .map_err(ApplyError::Task)??;
        if let Reconciled::Applied { drift, displaced } = outcome {
            if displaced {
                let count = self.displacements.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(generation, %drift, displacements = count, "firewall displaced by another program, put back first");
            } else if repaired {
                tracing::warn!(generation, %drift, "firewall changed by something else, put back");
            } else {
                tracing::info!(generation, %drift, "firewall brought in line");
            }
        }
        Ok(())
    }

    /// K3s on this node now: not installed, installing, running (its Node is Ready) or failed.
    pub async fn k3s_state(&self, node_name: &str) -> K3sState {
        k3s::observe(&self.root, self.systemd.as_ref(), self.readiness.as_ref(), node_name).await
    }
}

fn valid_label_value(value: &str) -> bool {
    value.len() <= 63
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && value.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        && value.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
}

fn valid_label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok =
        prefix.is_none_or(|p| !p.is_empty() && p.len() <= 253 && p.split('.').all(|l| validate_node_name(l).is_ok()));
    prefix_ok && !name.is_empty() && valid_label_value(name)
}

/// Checks what a spec asks for before anything acts on it.
pub fn check(spec: &NodeSpec) -> Result<(), ApplyError> {
    if spec.generation == 0 {
        return Err(ApplyError::ZeroGeneration);
    }
    validate_node_name(&spec.node_name).map_err(|e| ApplyError::BadNodeName(spec.node_name.clone(), e))?;
    for (key, value) in spec.labels.iter().chain(spec.taints.iter().map(|t| (&t.key, &t.value))) {
        if !valid_label_key(key) || !valid_label_value(value) {
            return Err(ApplyError::BadLabel { key: key.clone(), value: value.clone() });
        }
    }
    Ok(())
}

/// Records `spec` as the applied state (written only when it differs from the recorded one).
pub fn record(state: &StateDir, spec: &NodeSpec) -> Result<(), ApplyError> {
    if state.load_spec()?.as_ref() != Some(spec) {
        state.save_spec(spec)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isolation::firewall::{Firewall, MemoryFirewall, Recording, plan};
    use crate::k3s::testkit::{self, ArtifactServer, Fault, V2, quick_policy, server_spec};
    use crate::k3s::{RecordingSystemd, ScriptedReadiness};
    use hexa_shared::isolation::{IsolationSpec, TenantIsolation};
    use hexa_shared::names::Pool;

    /// The real applier over a temporary root and state directory, an in-memory firewall that
    /// records every batch written to it, and a recording service manager.
    struct Node {
        _dir: tempfile::TempDir,
        state: StateDir,
        firewall: Arc<Recording<MemoryFirewall>>,
        systemd: Arc<RecordingSystemd>,
        applier: Applier,
    }

    fn node() -> Node {
        testkit::init();
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(&dir.path().join("state")).unwrap();
        let firewall = Arc::new(Recording::new(MemoryFirewall::new()));
        let systemd = Arc::new(RecordingSystemd::new());
        let applier = Applier {
            state: state.clone(),
            root: dir.path().join("root"),
            systemd: systemd.clone(),
            readiness: Arc::new(ScriptedReadiness::new([Ok(true)])),
            fetcher: Arc::new(testkit::fetcher(quick_policy())),
            firewall: firewall.clone(),
            local_pods: Arc::new(crate::isolation::local_pods::CniResults::new(dir.path().join("cni"), "cni0")),
            displacements: Default::default(),
            figures: Default::default(),
        };
        Node { _dir: dir, state, firewall, systemd, applier }
    }

    fn isolated(spec: NodeSpec) -> NodeSpec {
        let isolation = IsolationSpec {
            pod_cidr: "10.42.0.0/16".parse().unwrap(),
            management_cidrs: vec!["192.168.100.10".parse().unwrap()],
            system_pod_ips: ["10.42.0.53".parse().unwrap()].into(),
            tenants: vec![TenantIsolation { tenant: "acme".into(), pod_ips: ["10.42.0.11".parse().unwrap()].into() }],
            node_addresses: Default::default(),
            node_services: Vec::new(),
        };
        NodeSpec { isolation: Some(isolation), ..spec }
    }

    #[tokio::test]
    async fn a_program_that_moves_our_rules_is_counted_as_a_displacement() {
        let node = node();
        let spec = isolated(NodeSpec::for_pool("n1", &Pool::Shared, 2));
        node.applier.apply(&spec).await.unwrap();
        node.applier.enforce_isolation(&spec).await.unwrap();
        assert_eq!(node.applier.displacements.load(Ordering::Relaxed), 0, "no drift, no displacement");
        node.firewall.inner().exec_iptables("*mangle\n-I FORWARD 1 -j ACCEPT\nCOMMIT\n").unwrap();
        node.applier.enforce_isolation(&spec).await.unwrap();
        assert_eq!(node.applier.displacements.load(Ordering::Relaxed), 1);
        // A new spec is a change of ours, not a displacement.
        let mut next = spec.clone();
        next.generation = 3;
        next.isolation.as_mut().unwrap().system_pod_ips.insert("10.42.0.54".parse().unwrap());
        node.applier.apply(&next).await.unwrap();
        assert_eq!(node.applier.displacements.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn rules_changed_behind_the_agent_are_counted_as_drift_repairs() {
        let node = node();
        let spec = isolated(NodeSpec::for_pool("n1", &Pool::Shared, 2));
        node.applier.apply(&spec).await.unwrap();
        let first = node.applier.figures.figures();
        assert_eq!((first.firewall_applies, first.firewall_drift_repairs), (1, 0), "{first:?}");
        node.applier.enforce_isolation(&spec).await.unwrap();
        assert_eq!(node.applier.figures.figures().firewall_applies, 1, "a reconcile that writes nothing is no apply");

        // Someone deletes one of our rules: the next reconcile puts it back and counts a repair.
        let current = node.firewall.inner().current().unwrap();
        let mut tampered = current.clone();
        tampered.chains.values_mut().find(|rules| !rules.is_empty()).expect("a chain with rules").pop();
        node.firewall.inner().apply(&plan(&tampered, &current).unwrap()).unwrap();
        node.applier.enforce_isolation(&spec).await.unwrap();
        let repaired = node.applier.figures.figures();
        assert_eq!((repaired.firewall_applies, repaired.firewall_drift_repairs), (2, 1), "{repaired:?}");
        assert!(repaired.firewall_apply_micros >= repaired.firewall_last_apply_micros);

        // A new spec is a change of ours: applied, not repaired.
        let mut next = spec.clone();
        next.generation = 3;
        next.isolation.as_mut().unwrap().system_pod_ips.insert("10.42.0.54".parse().unwrap());
        node.applier.apply(&next).await.unwrap();
        let changed = node.applier.figures.figures();
        assert_eq!((changed.firewall_applies, changed.firewall_drift_repairs), (3, 1), "{changed:?}");
    }

    #[tokio::test]
    async fn specs_are_checked_and_recorded_once() {
        let node = node();
        let spec = isolated(NodeSpec::for_pool("n1", &Pool::Dedicated { tenant: "acme".into() }, 2));
        node.applier.apply(&spec).await.unwrap();
        assert_eq!(node.state.load_spec().unwrap(), Some(spec.clone()));
        assert_eq!(node.firewall.writes().len(), 1, "the isolation was enforced");
        let mtime = std::fs::metadata(node.state.path("spec.json")).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        node.applier.apply(&spec).await.unwrap();
        assert_eq!(std::fs::metadata(node.state.path("spec.json")).unwrap().modified().unwrap(), mtime);
        assert_eq!(node.firewall.writes().len(), 1, "the same spec again writes nothing");
    }

    #[tokio::test]
    async fn a_refused_spec_records_and_touches_nothing() {
        let node = node();
        let spec = NodeSpec::for_pool("n1", &Pool::Dedicated { tenant: "acme".into() }, 2);
        node.applier.apply(&spec).await.unwrap();

        let mut bad_label = isolated(spec.clone());
        bad_label.generation = 3;
        bad_label.labels.insert("bad key!".into(), "x".into());
        assert!(matches!(node.applier.apply(&bad_label).await, Err(ApplyError::BadLabel { .. })));
        let zero = NodeSpec { generation: 0, ..isolated(spec.clone()) };
        assert!(matches!(node.applier.apply(&zero).await, Err(ApplyError::ZeroGeneration)));
        let bad_name = NodeSpec { node_name: "Not A Name".into(), generation: 3, ..isolated(spec.clone()) };
        assert!(matches!(node.applier.apply(&bad_name).await, Err(ApplyError::BadNodeName(..))));

        assert_eq!(node.state.load_spec().unwrap(), Some(spec), "a refused spec changes nothing");
        assert_eq!(node.firewall.writes(), [], "a refused spec's isolation is not enforced");
        assert_eq!(node.systemd.calls(), []);
    }

    #[tokio::test]
    async fn a_failed_k3s_step_records_nothing() {
        let node = node();
        let spec = NodeSpec::for_pool("n1", &Pool::Server, 2);
        node.applier.apply(&spec).await.unwrap();
        let server = ArtifactServer::start(&[V2]).await;
        server.set_fault(Fault::NotFound);
        let with_k3s = NodeSpec { generation: 3, ..spec.clone() }.with_k3s(Some(server_spec(server.source(), V2)));

        let err = node.applier.apply(&with_k3s).await.unwrap_err();

        assert!(matches!(err, ApplyError::K3s(K3sError::Fetch { .. })), "{err}");
        assert_eq!(node.state.load_spec().unwrap(), Some(spec), "a spec whose K3s step failed is not recorded");
        assert_eq!(node.systemd.calls(), [], "nothing was started");
    }

    /// A failed download reads the same in the report and in a printed error chain: the
    /// download's own sentence appears once, not once per layer.
    #[tokio::test]
    async fn a_failed_download_names_its_cause_once() {
        let node = node();
        let server = ArtifactServer::start(&[V2]).await;
        server.set_fault(Fault::Truncate(10));
        let spec = NodeSpec::for_pool("n1", &Pool::Server, 1).with_k3s(Some(server_spec(server.source(), V2)));

        let err = node.applier.apply(&spec).await.unwrap_err();

        let ApplyError::K3s(K3sError::Fetch { error, .. }) = &err else { panic!("not a download failure: {err}") };
        let root = error.to_string();
        assert!(root.starts_with("gave up after 3 attempts: "), "{root}");
        let reason = err.to_string();
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(chain.matches(&root).count(), 1, "{chain}");
        assert_eq!(chain, reason, "the chain is the reason the coordinator is told");
        assert!(chain.starts_with(&format!("k3s: cannot get k3s {V2}: gave up after 3 attempts: ")), "{chain}");
    }

    #[test]
    fn label_rules() {
        assert!(valid_label_key("hexabase.ai/pool"));
        assert!(valid_label_key("tenant.hexabase.ai/acme"));
        assert!(valid_label_key("plain"));
        assert!(!valid_label_key("/x"));
        assert!(!valid_label_key("a/"));
        assert!(valid_label_value(""));
        assert!(!valid_label_value("-x"));
    }
}

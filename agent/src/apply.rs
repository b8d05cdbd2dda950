//! Applying a `NodeSpec` to this node. The same [`Applier`] serves the link (every spec the
//! coordinator pushes), agent start-up (re-enforcing the last spec) and `hexa-agent apply`.
//!
//! A spec is checked, then its K3s part is applied (install, upgrade, reconfigure or uninstall,
//! doing nothing when the node already matches), and only then is it recorded as the node's
//! applied state: a spec that failed is not claimed as applied.

use std::path::PathBuf;
use std::sync::Arc;

use hexa_shared::k3s::K3sState;
use hexa_shared::names::validate_node_name;
use hexa_shared::spec::NodeSpec;

use crate::k3s::{self, Fetcher, K3sError, NodeReadiness, Systemd};
use crate::state::{StateDir, StateError};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("spec generation 0 is not valid: generations start at 1")]
    ZeroGeneration,
    #[error("spec names node {0:?}: {1}")]
    BadNodeName(String, String),
    #[error("label {key:?}={value:?} is not a valid Kubernetes label")]
    BadLabel { key: String, value: String },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("k3s: {0}")]
    K3s(#[from] K3sError),
    #[error("firewall: {0}")]
    Firewall(#[from] crate::isolation::firewall::FirewallError),
    #[error("firewall task failed: {0}")]
    Task(String),
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
        let firewall = self.firewall.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            crate::isolation::firewall::reconcile_spec(firewall.as_ref(), &isolation)
        })
        .await
        .map_err(|e| ApplyError::Task(e.to_string()))??;
        if let crate::isolation::firewall::Reconciled::Applied { drift } = outcome {
            tracing::info!(generation = spec.generation, %drift, "firewall brought in line");
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
    validate_node_name(&spec.node_name).map_err(|e| ApplyError::BadNodeName(spec.node_name.clone(), e.to_string()))?;
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
    use hexa_shared::names::Pool;

    fn apply(state: &StateDir, spec: &NodeSpec) -> Result<(), ApplyError> {
        check(spec)?;
        record(state, spec)
    }

    #[test]
    fn specs_are_checked_and_recorded_once() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let spec = NodeSpec::for_pool("n1", &Pool::Dedicated { tenant: "acme".into() }, 2);
        apply(&state, &spec).unwrap();
        assert_eq!(state.load_spec().unwrap(), Some(spec.clone()));
        let mtime = std::fs::metadata(state.path("spec.json")).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        apply(&state, &spec).unwrap();
        assert_eq!(std::fs::metadata(state.path("spec.json")).unwrap().modified().unwrap(), mtime);

        let mut bad = spec.clone();
        bad.labels.insert("bad key!".into(), "x".into());
        assert!(matches!(apply(&state, &bad), Err(ApplyError::BadLabel { .. })));
        assert!(matches!(apply(&state, &NodeSpec { generation: 0, ..spec.clone() }), Err(ApplyError::ZeroGeneration)));
        assert_eq!(state.load_spec().unwrap(), Some(spec), "a refused spec changes nothing");
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

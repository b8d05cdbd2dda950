//! Applying a `NodeSpec` to this node. The same function serves the link (every spec the
//! coordinator pushes), agent start-up (re-enforcing the last spec before any connection) and
//! `hexa-agent apply`.
//!
//! What a spec asks of the node grows with the product (K3s, isolation); today it is the node's
//! pool, labels and taints, which are validated and recorded as the node's desired state.

use hexa_shared::names::validate_node_name;
use hexa_shared::spec::NodeSpec;

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

/// Checks a spec and makes it this node's applied state.
pub fn apply(state: &StateDir, spec: &NodeSpec) -> Result<(), ApplyError> {
    if spec.generation == 0 {
        return Err(ApplyError::ZeroGeneration);
    }
    validate_node_name(&spec.node_name).map_err(|e| ApplyError::BadNodeName(spec.node_name.clone(), e.to_string()))?;
    for (key, value) in spec.labels.iter().chain(spec.taints.iter().map(|t| (&t.key, &t.value))) {
        if !valid_label_key(key) || !valid_label_value(value) {
            return Err(ApplyError::BadLabel { key: key.clone(), value: value.clone() });
        }
    }
    if state.load_spec()?.as_ref() != Some(spec) {
        state.save_spec(spec)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hexa_shared::names::Pool;

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

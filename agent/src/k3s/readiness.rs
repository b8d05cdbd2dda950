//! Whether K3s has brought this node up: its Node object is `Ready`, as read with the node's own
//! kubeconfig (`/etc/rancher/k3s/k3s.yaml` on a server, the kubelet's
//! `/var/lib/rancher/k3s/agent/kubelet.kubeconfig` on an agent).
//!
//! The seam is [`NodeReadiness`]. The implementation that talks to the API server needs a
//! Kubernetes client (kube + k8s-openapi), which the agent crate does not depend on yet; it is the
//! integrator's to add. `ScriptedReadiness` serves the tests (with the `testing` feature).

#[cfg(any(test, feature = "testing"))]
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
#[cfg(any(test, feature = "testing"))]
use std::sync::Mutex;
use std::time::Duration;

use super::kubectl::Kubectl;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadinessError {
    /// The API server could not be asked (not up yet, kubeconfig missing, credentials refused).
    #[error("cannot read node {node} with {kubeconfig}: {message}")]
    Unavailable { node: String, kubeconfig: PathBuf, message: String },
    #[error(
        "node {node} is not Ready after {after:?} (last seen: {last}); see `journalctl -u k3s*` on the node \
         and `kubectl describe node {node}`"
    )]
    TimedOut { node: String, after: Duration, last: String },
}

/// The answer of one look at the Node object.
pub type ReadyFuture<'a> = Pin<Box<dyn Future<Output = Result<bool, ReadinessError>> + Send + 'a>>;

/// Looks at a Node object.
pub trait NodeReadiness: Send + Sync + fmt::Debug {
    /// Whether Node `node_name` has the condition `Ready=True`, asked with the credentials of
    /// `kubeconfig` (a path under the installer's root). `Ok(false)` when the Node does not exist
    /// yet or is not Ready; `Err` when the API server cannot be asked.
    fn node_ready<'a>(&'a self, kubeconfig: &'a Path, node_name: &'a str) -> ReadyFuture<'a>;
}

/// Waits until `node_name` is Ready, asking every `poll`, for at most `timeout`.
pub async fn wait_ready(
    readiness: &dyn NodeReadiness,
    kubeconfig: &Path,
    node_name: &str,
    timeout: Duration,
    poll: Duration,
) -> Result<(), ReadinessError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match readiness.node_ready(kubeconfig, node_name).await {
            Ok(true) => return Ok(()),
            Ok(false) => "not Ready".to_string(),
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() + poll > deadline {
            return Err(ReadinessError::TimedOut { node: node_name.to_string(), after: timeout, last });
        }
        tracing::debug!(node = node_name, last = %last, "waiting for the node to be Ready");
        tokio::time::sleep(poll).await;
    }
}

/// A readiness that answers from a script, then repeats its last answer; records what it was
/// asked.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Default)]
pub struct ScriptedReadiness {
    inner: Mutex<Script>,
}

#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Default)]
struct Script {
    answers: VecDeque<Result<bool, ReadinessError>>,
    asked: Vec<(PathBuf, String)>,
}

#[cfg(any(test, feature = "testing"))]
impl ScriptedReadiness {
    pub fn new(answers: impl IntoIterator<Item = Result<bool, ReadinessError>>) -> ScriptedReadiness {
        ScriptedReadiness { inner: Mutex::new(Script { answers: answers.into_iter().collect(), asked: Vec::new() }) }
    }

    /// Every (kubeconfig, node) asked about, oldest first.
    pub fn asked(&self) -> Vec<(PathBuf, String)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).asked.clone()
    }
}

#[cfg(any(test, feature = "testing"))]
impl NodeReadiness for ScriptedReadiness {
    fn node_ready<'a>(&'a self, kubeconfig: &'a Path, node_name: &'a str) -> ReadyFuture<'a> {
        let mut script = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        script.asked.push((kubeconfig.to_path_buf(), node_name.to_string()));
        let answer =
            if script.answers.len() > 1 { script.answers.pop_front() } else { script.answers.front().cloned() };
        Box::pin(async move { answer.unwrap_or(Ok(false)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_through_an_unreachable_api_until_ready() {
        let unavailable = ReadinessError::Unavailable {
            node: "n1".into(),
            kubeconfig: "/k".into(),
            message: "connection refused".into(),
        };
        let readiness = ScriptedReadiness::new([Err(unavailable), Ok(false), Ok(true)]);
        wait_ready(&readiness, Path::new("/k"), "n1", Duration::from_secs(5), Duration::from_millis(1)).await.unwrap();
        assert_eq!(readiness.asked().len(), 3);
    }

    #[tokio::test]
    async fn gives_up_with_what_it_last_saw() {
        let readiness = ScriptedReadiness::new([Ok(false)]);
        let err = wait_ready(&readiness, Path::new("/k"), "n1", Duration::from_millis(30), Duration::from_millis(5))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("node n1 is not Ready after 30ms (last seen: not Ready)"), "{err}");
    }
}

/// Asks the API server through the `kubectl` built into the installed `k3s` binary, with the
/// node's own kubeconfig (the node authorizer lets a kubelet read its own Node).
#[derive(Debug, Clone)]
pub struct KubectlReadiness {
    pub kubectl: Kubectl,
}

impl KubectlReadiness {
    pub fn under(root: &Path) -> KubectlReadiness {
        KubectlReadiness { kubectl: Kubectl::under(root) }
    }
}

impl NodeReadiness for KubectlReadiness {
    fn node_ready<'a>(&'a self, kubeconfig: &'a Path, node_name: &'a str) -> ReadyFuture<'a> {
        Box::pin(async move {
            let unavailable = |message: String| ReadinessError::Unavailable {
                node: node_name.to_string(),
                kubeconfig: kubeconfig.to_path_buf(),
                message,
            };
            let output = self
                .kubectl
                .run(
                    kubeconfig,
                    &["get", "node", node_name, "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}"],
                )
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            if output.success {
                Ok(output.stdout.trim() == "True")
            } else if output.stderr.contains("NotFound") || output.stderr.contains("not found") {
                Ok(false)
            } else {
                Err(unavailable(output.stderr.trim().to_string()))
            }
        })
    }
}

#[cfg(test)]
mod kubectl_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn stand_in(dir: &Path, script: &str) -> KubectlReadiness {
        let path = dir.join("k3s");
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        KubectlReadiness { kubectl: Kubectl { k3s: path, timeout: Duration::from_secs(5) } }
    }

    #[tokio::test]
    async fn kubectl_answers_become_readiness() {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        // The stand-in checks it was asked the right question.
        let ready = stand_in(
            dir.path(),
            r#"[ "$1 $2 $4 $5 $6" = "kubectl --kubeconfig get node n1" ] && printf True || { echo "bad args: $*" >&2; exit 2; }"#,
        );
        assert_eq!(ready.node_ready(&kubeconfig, "n1").await, Ok(true));
        assert!(matches!(ready.node_ready(&kubeconfig, "n2").await, Err(ReadinessError::Unavailable { .. })));
        let not_ready = stand_in(dir.path(), "printf False");
        assert_eq!(not_ready.node_ready(&kubeconfig, "n1").await, Ok(false));
        let missing = stand_in(dir.path(), r#"echo 'Error from server (NotFound): nodes "n1" not found' >&2; exit 1"#);
        assert_eq!(missing.node_ready(&kubeconfig, "n1").await, Ok(false));
        let absent =
            KubectlReadiness { kubectl: Kubectl { k3s: dir.path().join("nope"), timeout: Duration::from_secs(1) } };
        let err = absent.node_ready(&kubeconfig, "n1").await.unwrap_err().to_string();
        assert!(err.contains("cannot run"), "{err}");
    }
}

//! The pods running on this node, for the capacity report (the coordinator builds tenants' IP sets
//! from them) and for the cgroup governor. A pod belongs to tenant `t` when it runs in the host
//! namespace `hx-<t>`: vCluster syncs a tenant's workloads there (labelled
//! `vcluster.loft.sh/managed-by`), and its control plane runs there too.

use std::future::Future;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
#[cfg(any(test, feature = "testing"))]
use std::sync::Mutex;

use hexa_shared::report::PodInfo;

use crate::k3s::{Kubectl, KubectlError};

pub type PodsFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<PodInfo>, PodsError>> + Send + 'a>>;

/// Why the node's pods could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum PodsError {
    #[error("listing pods took longer than {after:?}")]
    Timeout { after: std::time::Duration },
    #[error("cannot run {}: {error}", program.display())]
    Spawn { program: PathBuf, error: std::io::Error },
    /// `kubectl` answered with an error; its message.
    #[error("{stderr}")]
    Kubectl { stderr: String },
    #[error("not a pod list: {error}")]
    NotJson { error: serde_json::Error },
    #[error("not a pod list: no items")]
    NoItems,
}

impl From<KubectlError> for PodsError {
    fn from(error: KubectlError) -> Self {
        match error {
            KubectlError::Timeout { after } => PodsError::Timeout { after },
            KubectlError::Spawn { program, error } => PodsError::Spawn { program, error },
        }
    }
}

/// Where the agent learns which pods run on its node.
pub trait PodSource: Send + Sync + std::fmt::Debug {
    fn pods<'a>(&'a self, node_name: &'a str) -> PodsFuture<'a>;
}

/// The tenant of a pod in host namespace `namespace`.
pub fn tenant_of(namespace: &str) -> Option<String> {
    hexa_shared::names::tenant_of_namespace(namespace).map(str::to_string)
}

/// Reads a `kubectl get pods -o json` list.
pub fn parse_pod_list(json: &str) -> Result<Vec<PodInfo>, PodsError> {
    let list: serde_json::Value = serde_json::from_str(json).map_err(|error| PodsError::NotJson { error })?;
    let items = list["items"].as_array().ok_or(PodsError::NoItems)?;
    let mut pods: Vec<PodInfo> = items
        .iter()
        .map(|item| {
            let meta = &item["metadata"];
            let namespace = meta["namespace"].as_str().unwrap_or_default().to_string();
            PodInfo {
                tenant: tenant_of(&namespace),
                name: meta["name"].as_str().unwrap_or_default().to_string(),
                uid: meta["uid"].as_str().unwrap_or_default().to_string(),
                // Pods on the host network share the node's address: they are not pod traffic.
                ip: if item["spec"]["hostNetwork"].as_bool() == Some(true) {
                    None
                } else {
                    item["status"]["podIP"].as_str().and_then(|ip| ip.parse::<Ipv4Addr>().ok())
                },
                namespace,
            }
        })
        .collect();
    pods.sort();
    Ok(pods)
}

/// Asks the API server through the installed `k3s kubectl`, with this node's own kubeconfig (the
/// node authorizer lets a kubelet list the pods bound to it).
#[derive(Debug, Clone)]
pub struct KubectlPodSource {
    pub root: PathBuf,
    pub kubectl: Kubectl,
}

impl KubectlPodSource {
    pub fn under(root: &Path) -> KubectlPodSource {
        KubectlPodSource { root: root.to_path_buf(), kubectl: Kubectl::under(root) }
    }
}

impl PodSource for KubectlPodSource {
    fn pods<'a>(&'a self, node_name: &'a str) -> PodsFuture<'a> {
        Box::pin(async move {
            // No K3s installed by us: no pods to know of, and nothing to ask.
            let Ok(Some(manifest)) = crate::k3s::installed(&self.root) else { return Ok(Vec::new()) };
            let kubeconfig =
                crate::k3s::paths::under(&self.root, Path::new(crate::k3s::paths::kubeconfig(manifest.role)));
            let selector = format!("spec.nodeName={node_name}");
            let output = self
                .kubectl
                .run(&kubeconfig, &["get", "pods", "-A", "--field-selector", &selector, "-o", "json"])
                .await?;
            if !output.success {
                return Err(PodsError::Kubectl { stderr: output.stderr.trim().to_string() });
            }
            parse_pod_list(&output.stdout)
        })
    }
}

/// A fixed list a test can change.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Default)]
pub struct StaticPodSource(Mutex<Vec<PodInfo>>);

#[cfg(any(test, feature = "testing"))]
impl StaticPodSource {
    pub fn new(pods: Vec<PodInfo>) -> StaticPodSource {
        StaticPodSource(Mutex::new(pods))
    }

    pub fn set(&self, pods: Vec<PodInfo>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = pods;
    }
}

#[cfg(any(test, feature = "testing"))]
impl PodSource for StaticPodSource {
    fn pods<'a>(&'a self, _node_name: &'a str) -> PodsFuture<'a> {
        let pods = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Box::pin(async move { Ok(pods) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_map_to_tenants_by_host_namespace() {
        assert_eq!(tenant_of("hx-acme").as_deref(), Some("acme"));
        assert_eq!(tenant_of("kube-system"), None);
        assert_eq!(tenant_of("hx-"), None);
        assert_eq!(tenant_of("hx-Bad_Name"), None);
    }

    #[test]
    fn kubectl_pod_lists_are_read() {
        let json = r#"{"items": [
            {"metadata": {"namespace": "hx-acme", "name": "web-x-acme", "uid": "u1",
              "labels": {"vcluster.loft.sh/managed-by": "vcluster-acme"}},
             "spec": {}, "status": {"podIP": "10.42.1.5"}},
            {"metadata": {"namespace": "kube-system", "name": "coredns", "uid": "u2"}, "spec": {}, "status": {"podIP": "10.42.1.10"}},
            {"metadata": {"namespace": "kube-system", "name": "svclb", "uid": "u3"}, "spec": {"hostNetwork": true}, "status": {"podIP": "192.168.1.4"}},
            {"metadata": {"namespace": "hx-acme", "name": "pending", "uid": "u4"}, "spec": {}, "status": {}}
        ]}"#;
        let pods = parse_pod_list(json).unwrap();
        assert_eq!(pods.len(), 4);
        let web = pods.iter().find(|p| p.uid == "u1").unwrap();
        assert_eq!((web.tenant.as_deref(), web.ip), (Some("acme"), Some("10.42.1.5".parse().unwrap())));
        assert_eq!(pods.iter().find(|p| p.uid == "u3").unwrap().ip, None, "host-network pods have no pod IP");
        assert_eq!(pods.iter().find(|p| p.uid == "u4").unwrap().ip, None);
        assert!(parse_pod_list("{}").is_err());
    }

    #[tokio::test]
    async fn without_k3s_there_is_nothing_to_ask() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(KubectlPodSource::under(dir.path()).pods("n1").await.unwrap(), Vec::new());
    }
}

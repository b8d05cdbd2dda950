//! Minting the coordinator's access to the host cluster, on a `server` node whose K3s runs: the
//! ServiceAccount, ClusterRole, binding and token Secret of [`hexa_shared::host_access`], applied
//! with the admin kubeconfig K3s wrote on this node, and the token the token controller puts in the
//! Secret. The admin kubeconfig never leaves the node; only the narrow token does.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use tracing::info;

use hexa_shared::host_access::{self, HostAccess};

use super::paths;

/// How long the token controller gets to fill the Secret.
const TOKEN_WAIT: Duration = Duration::from_secs(30);
const TOKEN_POLL: Duration = Duration::from_millis(250);

/// Why this node could not mint access; the text goes back to the coordinator as it is.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("no K3s admin kubeconfig at {}: this node does not run a K3s server (yet)", path.display())]
    NoKubeconfig { path: PathBuf },
    #[error("K3s admin kubeconfig {}: {error}", path.display())]
    Kubeconfig { path: PathBuf, error: String },
    #[error("{what} on the node's K3s: {error}")]
    Api { what: String, error: kube::Error },
    #[error("the token controller did not fill Secret {namespace}/{name} within {after:?}", namespace = host_access::NAMESPACE, name = host_access::TOKEN_SECRET)]
    NoToken { after: Duration },
    #[error(
        "the cluster's CA is neither in Secret {}/{} nor in the kubeconfig",
        host_access::NAMESPACE,
        host_access::TOKEN_SECRET
    )]
    NoCa,
}

/// Applies the coordinator's ServiceAccount and its rights on the K3s server under `root` and
/// returns its token, the cluster's CA and the API server's URL as the admin kubeconfig names it.
pub async fn mint(root: &Path) -> Result<HostAccess, MintError> {
    let path = paths::under(root, Path::new(paths::SERVER_KUBECONFIG));
    if !path.exists() {
        return Err(MintError::NoKubeconfig { path });
    }
    let bad = |error: String| MintError::Kubeconfig { path: path.clone(), error };
    let file = kube::config::Kubeconfig::read_from(&path).map_err(|e| bad(e.to_string()))?;
    let config =
        kube::Config::from_custom_kubeconfig(file, &Default::default()).await.map_err(|e| bad(e.to_string()))?;
    let server_url = config.cluster_url.to_string();
    let kubeconfig_ca = config.root_cert.clone();
    let client = kube::Client::try_from(config).map_err(|e| bad(e.to_string()))?;

    let params = PatchParams::apply(host_access::FIELD_MANAGER).force();
    for object in host_access::manifests() {
        let kind = object["kind"].as_str().unwrap_or_default().to_string();
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let (group, version) = match object["apiVersion"].as_str().unwrap_or_default().split_once('/') {
            Some((group, version)) => (group.to_string(), version.to_string()),
            None => (String::new(), object["apiVersion"].as_str().unwrap_or_default().to_string()),
        };
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(&group, &version, &kind));
        let api: Api<DynamicObject> = match object["metadata"]["namespace"].as_str() {
            Some(namespace) => Api::namespaced_with(client.clone(), namespace, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        api.patch(&name, &params, &Patch::Apply(&object))
            .await
            .map_err(|error| MintError::Api { what: format!("applying {kind} {name}"), error })?;
    }

    let secrets: Api<Secret> = Api::namespaced(client, host_access::NAMESPACE);
    let deadline = tokio::time::Instant::now() + TOKEN_WAIT;
    loop {
        let secret = secrets.get(host_access::TOKEN_SECRET).await.map_err(|error| MintError::Api {
            what: format!("reading Secret {}/{}", host_access::NAMESPACE, host_access::TOKEN_SECRET),
            error,
        })?;
        let data = secret.data.unwrap_or_default();
        let token = data.get("token").map(|t| String::from_utf8_lossy(&t.0).trim().to_string()).unwrap_or_default();
        if !token.is_empty() {
            let ca_pem = match data.get("ca.crt") {
                Some(ca) if !ca.0.is_empty() => String::from_utf8_lossy(&ca.0).into_owned(),
                _ => pem_bundle(kubeconfig_ca.as_deref().unwrap_or_default()).ok_or(MintError::NoCa)?,
            };
            info!(server_url, "host-cluster access minted for the coordinator");
            return Ok(HostAccess { server_url, ca_pem, token });
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(MintError::NoToken { after: TOKEN_WAIT });
        }
        tokio::time::sleep(TOKEN_POLL).await;
    }
}

/// The kubeconfig's CA certificates (DER) as one PEM bundle; `None` when it has none.
fn pem_bundle(certs: &[Vec<u8>]) -> Option<String> {
    if certs.is_empty() {
        return None;
    }
    Some(certs.iter().map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.clone()))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_node_without_a_k3s_server_says_so() {
        let root = tempfile::tempdir().unwrap();
        let err = mint(root.path()).await.unwrap_err().to_string();
        assert!(err.starts_with("no K3s admin kubeconfig at ") && err.contains("etc/rancher/k3s/k3s.yaml"), "{err}");
        let kubeconfig = paths::under(root.path(), Path::new(paths::SERVER_KUBECONFIG));
        std::fs::create_dir_all(kubeconfig.parent().unwrap()).unwrap();
        std::fs::write(&kubeconfig, "clusters: [oops").unwrap();
        let err = mint(root.path()).await.unwrap_err().to_string();
        assert!(err.starts_with("K3s admin kubeconfig "), "{err}");
    }

    #[test]
    fn the_kubeconfig_ca_becomes_a_pem_bundle() {
        assert_eq!(pem_bundle(&[]), None);
        let bundle = pem_bundle(&[vec![1, 2, 3], vec![4]]).unwrap();
        assert_eq!(bundle.matches("-----BEGIN CERTIFICATE-----").count(), 2, "{bundle}");
    }
}

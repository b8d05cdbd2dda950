//! Where the coordinator's host-cluster credentials come from, in this order: the operator's
//! `[hostcluster] kubeconfig`; one found as kubectl finds it (`KUBECONFIG`, `~/.kube/config`, a
//! pod's service account); the access a `server` node minted earlier, kept in the state directory
//! (0600); or, when there is none, access minted now by the first `server` node whose K3s runs,
//! asked over its mutual-TLS link ([`Bootstrap`]). Until then tenants wait, with a `Deployed`
//! condition that says what for.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use hexa_shared::host_access::{self, HostAccess, MAX_CA_LEN, MAX_TOKEN_LEN, MAX_URL_LEN};
use hexa_shared::k3s::K3sState;
use hexa_shared::names::Pool;

use crate::inventory::Inventory;
use crate::store::Health;

/// The minted access, as a kubeconfig in the coordinator's state directory.
pub const STORED_KUBECONFIG: &str = "host-cluster.kubeconfig";
/// How long a node gets to mint (it waits up to 30 s on K3s' token controller itself).
const MINT_TIMEOUT: Duration = Duration::from_secs(45);

/// One pending request for a node's host-cluster access.
pub type AccessReply = oneshot::Sender<Result<HostAccess, String>>;

/// The links of `server` nodes, by node: where each comes from and how to ask it for access.
/// The link registers itself while it is up ([`AccessRequests::register`]).
#[derive(Debug, Default)]
pub struct AccessRequests {
    links: Mutex<HashMap<String, (IpAddr, mpsc::Sender<AccessReply>)>>,
}

/// Removes a link's entry when the link ends.
#[derive(Debug)]
pub struct Registration {
    requests: Arc<AccessRequests>,
    node: String,
    sender: mpsc::Sender<AccessReply>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut links = self.requests.links.lock().unwrap_or_else(|p| p.into_inner());
        // A newer link of the same node may have replaced this one already.
        if links.get(&self.node).is_some_and(|(_, sender)| sender.same_channel(&self.sender)) {
            links.remove(&self.node);
        }
    }
}

impl AccessRequests {
    /// Registers the link of `server` node `node`, coming from `address`; the link sends each
    /// request it receives to its node and answers it with the node's reply.
    pub fn register(self: &Arc<Self>, node: &str, address: IpAddr) -> (Registration, mpsc::Receiver<AccessReply>) {
        let (sender, receiver) = mpsc::channel(4);
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.insert(node.to_string(), (address, sender.clone()));
        (Registration { requests: self.clone(), node: node.to_string(), sender }, receiver)
    }

    fn link(&self, node: &str) -> Option<(IpAddr, mpsc::Sender<AccessReply>)> {
        self.links.lock().unwrap_or_else(|p| p.into_inner()).get(node).cloned()
    }

    /// Asks `node` for access and waits for its answer.
    async fn ask(&self, node: &str) -> Result<(IpAddr, HostAccess), String> {
        let (address, sender) = self.link(node).ok_or_else(|| format!("node {node} has no link open"))?;
        let (reply, answer) = oneshot::channel();
        sender.send(reply).await.map_err(|_| format!("the link of node {node} closed"))?;
        match tokio::time::timeout(MINT_TIMEOUT, answer).await {
            Err(_) => Err(format!("node {node} did not answer within {}s", MINT_TIMEOUT.as_secs())),
            Ok(Err(_)) => Err(format!("the link of node {node} closed before it answered")),
            Ok(Ok(result)) => result.map(|access| (address, access)).map_err(|why| format!("node {node}: {why}")),
        }
    }
}

/// The URL the coordinator reaches a node's API server at: the address the node's link comes
/// from (the node's own kubeconfig names its loopback) with the scheme and port the node's
/// kubeconfig gives. Plain HTTP only to a loopback address, so a token never crosses a network in
/// clear.
pub fn server_url(reported: &str, address: IpAddr) -> Result<String, String> {
    if reported.len() > MAX_URL_LEN {
        return Err(format!("the API server URL is longer than {MAX_URL_LEN} bytes"));
    }
    let url = reqwest::Url::parse(reported).map_err(|e| format!("API server URL {reported:?}: {e}"))?;
    match url.scheme() {
        "https" => {}
        "http" if address.is_loopback() => {}
        other => return Err(format!("API server URL {reported:?}: scheme {other} is not https")),
    }
    let port = url.port_or_known_default().unwrap_or(6443);
    let host = match address {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    };
    Ok(format!("{}://{host}:{port}", url.scheme()))
}

/// Checks what a node sent before any of it is used.
fn check(access: &HostAccess) -> Result<(), String> {
    if access.token.is_empty() || access.token.len() > MAX_TOKEN_LEN {
        return Err(format!("the token is empty or longer than {MAX_TOKEN_LEN} bytes"));
    }
    if !access.token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token holds characters a bearer token cannot".into());
    }
    if access.ca_pem.len() > MAX_CA_LEN {
        return Err(format!("the CA bundle is longer than {MAX_CA_LEN} bytes"));
    }
    let certs = pem::parse_many(&access.ca_pem).map_err(|e| format!("the CA bundle is not PEM: {e}"))?;
    if certs.is_empty() || certs.iter().any(|c| c.tag() != "CERTIFICATE") {
        return Err("the CA bundle holds no certificate, or something else".into());
    }
    Ok(())
}

/// The kubeconfig of `access` at `server` (JSON, which every YAML reader takes).
pub fn kubeconfig(server: &str, access: &HostAccess) -> String {
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(access.ca_pem.as_bytes());
    let user = format!("system:serviceaccount:{}:{}", host_access::NAMESPACE, host_access::SERVICE_ACCOUNT);
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "host", "cluster": {"server": server, "certificate-authority-data": ca}}],
        "users": [{"name": user, "user": {"token": access.token}}],
        "contexts": [{"name": "host", "context": {"cluster": "host", "user": user}}],
        "current-context": "host",
    });
    serde_json::to_string_pretty(&config).unwrap_or_default()
}

/// A client from the kubeconfig at `path`.
pub async fn client_from(path: &Path) -> Result<kube::Client, String> {
    let file = kube::config::Kubeconfig::read_from(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    kube::Client::try_from(config).map_err(|e| format!("{}: {e}", path.display()))
}

/// Fetches host-cluster access from a `server` node, once, while the coordinator has none.
#[derive(Debug)]
pub struct Bootstrap {
    pub requests: Arc<AccessRequests>,
    pub inventory: Arc<Inventory>,
    /// Where the minted kubeconfig is kept.
    pub stored: PathBuf,
}

impl Bootstrap {
    /// `server` nodes that may be asked now: linked, Ready, their K3s running. First by name, so
    /// that every coordinator pass asks the same node first.
    fn candidates(&self) -> Vec<String> {
        let mut nodes: Vec<String> = self
            .inventory
            .list()
            .into_iter()
            .filter(|n| n.pool == Pool::Server && n.health == Health::Ready && n.revoked_at_unix.is_none())
            .filter(|n| matches!(n.k3s, Some(K3sState::Running { .. })))
            .filter(|n| self.requests.link(&n.name).is_some())
            .map(|n| n.name)
            .collect();
        nodes.sort();
        nodes
    }

    /// One attempt: asks each candidate in turn until one's access works. Returns the client, or
    /// what the tenants wait for.
    pub async fn attempt(&self) -> Result<kube::Client, String> {
        let candidates = self.candidates();
        if candidates.is_empty() {
            return Err("no kubeconfig is configured, and no server node runs K3s yet; access to the host \
                 cluster is fetched from the first server node whose K3s runs"
                .into());
        }
        let mut failures = Vec::new();
        for node in candidates {
            match self.access_through(&node).await {
                Ok(client) => return Ok(client),
                Err(why) => {
                    tracing::warn!(%node, reason = %why, "cannot get host-cluster access from this server node");
                    failures.push(why);
                }
            }
        }
        Err(format!("no kubeconfig is configured, and no server node gave access yet: {}", failures.join("; ")))
    }

    async fn access_through(&self, node: &str) -> Result<kube::Client, String> {
        let (address, access) = self.requests.ask(node).await?;
        check(&access).map_err(|why| format!("node {node} sent unusable access: {why}"))?;
        let server = server_url(&access.server_url, address).map_err(|why| format!("node {node}: {why}"))?;
        let text = kubeconfig(&server, &access);
        // Tried from a scratch file before it replaces anything.
        let scratch = self.stored.with_extension("new");
        hexa_shared::fsutil::write_atomic(&scratch, text.as_bytes(), hexa_shared::fsutil::SECRET_MODE)
            .map_err(|e| e.to_string())?;
        let client = client_from(&scratch).await?;
        client
            .apiserver_version()
            .await
            .map_err(|e| format!("the API server of node {node} at {server} does not answer: {e}"))?;
        std::fs::rename(&scratch, &self.stored).map_err(|e| format!("{}: {e}", self.stored.display()))?;
        tracing::info!(%node, %server, kubeconfig = %self.stored.display(), "host-cluster access fetched from a server node");
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(token: &str, ca: &str) -> HostAccess {
        HostAccess { server_url: "https://127.0.0.1:6443".into(), ca_pem: ca.into(), token: token.into() }
    }

    const CA: &str = "-----BEGIN CERTIFICATE-----\nAQID\n-----END CERTIFICATE-----\n";

    #[test]
    fn the_server_is_the_node_s_address_with_its_scheme_and_port() {
        let node: IpAddr = "10.0.0.5".parse().unwrap();
        assert_eq!(server_url("https://127.0.0.1:6443", node).unwrap(), "https://10.0.0.5:6443");
        assert_eq!(server_url("https://127.0.0.1:7443/x", node).unwrap(), "https://10.0.0.5:7443");
        assert_eq!(server_url("https://localhost", node).unwrap(), "https://10.0.0.5:443");
        let v6: IpAddr = "fd00::5".parse().unwrap();
        assert_eq!(server_url("https://127.0.0.1:6443", v6).unwrap(), "https://[fd00::5]:6443");
        // Plain HTTP only where nothing crosses a network.
        assert!(server_url("http://127.0.0.1:8080", node).unwrap_err().contains("not https"));
        assert_eq!(server_url("http://127.0.0.1:8080", "127.0.0.1".parse().unwrap()).unwrap(), "http://127.0.0.1:8080");
        assert!(server_url("ftp://x", node).is_err());
        assert!(server_url("not a url", node).is_err());
        assert!(server_url(&format!("https://{}", "a".repeat(2000)), node).unwrap_err().contains("longer"));
    }

    #[test]
    fn what_a_node_sends_is_checked_before_use() {
        assert!(check(&access("eyJhbGciOi.x.y", CA)).is_ok());
        assert!(check(&access("", CA)).is_err());
        assert!(check(&access(&"t".repeat(MAX_TOKEN_LEN + 1), CA)).is_err());
        assert!(check(&access("a token\nInjected: header", CA)).is_err());
        assert!(check(&access("t", "not pem")).is_err());
        assert!(check(&access("t", "-----BEGIN PRIVATE KEY-----\nAQID\n-----END PRIVATE KEY-----\n")).is_err());
        assert!(check(&access("t", &CA.repeat(MAX_CA_LEN / CA.len() + 1))).is_err());
    }

    #[test]
    fn the_kubeconfig_reads_back_with_the_token_and_ca() {
        let text = kubeconfig("https://10.0.0.5:6443", &access("tok.en", CA));
        let parsed = kube::config::Kubeconfig::from_yaml(&text).unwrap();
        let cluster = parsed.clusters[0].cluster.clone().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://10.0.0.5:6443"));
        assert!(cluster.certificate_authority_data.is_some());
        assert_eq!(parsed.current_context.as_deref(), Some("host"));
        assert!(text.contains("\"token\": \"tok.en\""), "{text}");
    }

    #[tokio::test]
    async fn a_link_that_ends_leaves_the_registry_unless_a_newer_one_took_its_place() {
        let requests = Arc::new(AccessRequests::default());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let (first, _rx1) = requests.register("cp-1", ip);
        let (second, _rx2) = requests.register("cp-1", ip);
        drop(first);
        assert!(requests.link("cp-1").is_some(), "the newer link stays");
        drop(second);
        assert!(requests.link("cp-1").is_none());
        assert!(requests.ask("cp-1").await.unwrap_err().contains("no link open"));
    }
}

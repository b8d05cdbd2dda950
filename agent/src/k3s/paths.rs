//! Where K3s' files live on a node. Paths here are the node's own (absolute); [`under`] places them
//! under the injected root, which is `/` in production and a temporary directory in tests.

use std::path::{Path, PathBuf};

use hexa_shared::k3s::RoleKind;

/// The k3s binary, where K3s' installer puts it.
pub const BINARY: &str = "/usr/local/bin/k3s";
/// K3s' configuration file, read by both `k3s server` and `k3s agent`.
pub const CONFIG: &str = "/etc/rancher/k3s/config.yaml";
/// Where the unit and its environment file go.
pub const SYSTEMD_DIR: &str = "/etc/systemd/system";
/// What the agent installed, so that it can tell an upgrade from a no-op and remove exactly that.
pub const MANIFEST: &str = "/var/lib/hexabase/agent/k3s-installed.json";
/// Downloads in progress, kept across attempts so that they resume.
pub const DOWNLOAD_DIR: &str = "/var/lib/hexabase/agent/k3s-download";
/// The admin kubeconfig a K3s server writes.
pub const SERVER_KUBECONFIG: &str = "/etc/rancher/k3s/k3s.yaml";
/// The kubelet's kubeconfig on a K3s agent.
pub const AGENT_KUBECONFIG: &str = "/var/lib/rancher/k3s/agent/kubelet.kubeconfig";
/// The cluster's server CA, written by the K3s server; secure join tokens pin its sha256.
pub const SERVER_CA: &str = "/var/lib/rancher/k3s/server/tls/server-ca.crt";

/// `node_path` (absolute on the node) under `root`.
pub fn under(root: &Path, node_path: &Path) -> PathBuf {
    root.join(node_path.strip_prefix("/").unwrap_or(node_path))
}

/// The kubeconfig a node of `role` can read its own Node object with.
pub fn kubeconfig(role: RoleKind) -> &'static str {
    match role {
        RoleKind::Server => SERVER_KUBECONFIG,
        RoleKind::Agent => AGENT_KUBECONFIG,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_paths_land_under_the_root() {
        assert_eq!(under(Path::new("/tmp/r"), Path::new(BINARY)), Path::new("/tmp/r/usr/local/bin/k3s"));
        assert_eq!(under(Path::new("/"), Path::new(CONFIG)), Path::new("/etc/rancher/k3s/config.yaml"));
    }
}

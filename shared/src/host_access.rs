//! The coordinator's access to the host cluster when nobody handed it a kubeconfig: a
//! ServiceAccount on the host K3s with only the rights the coordinator's reconcilers use, minted by
//! the agent of a `server` node through its own K3s (with the admin kubeconfig only that node has)
//! and sent back over the node's mutual-TLS link.
//!
//! Both sides read this module: the agent applies [`manifests`], the coordinator's tests hold its
//! API calls to [`COORDINATOR_RULES`].

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Where the ServiceAccount and its token Secret live.
pub const NAMESPACE: &str = "kube-system";
/// The ServiceAccount the coordinator acts as.
pub const SERVICE_ACCOUNT: &str = "hexa-coordinator";
/// The ClusterRole and ClusterRoleBinding that grant [`COORDINATOR_RULES`] to it.
pub const CLUSTER_ROLE: &str = "hexabase:coordinator";
/// The long-lived token Secret (`kubernetes.io/service-account-token`) the token controller fills.
pub const TOKEN_SECRET: &str = "hexa-coordinator-token";
/// Field manager the agent applies these objects with.
pub const FIELD_MANAGER: &str = "hexa-agent";

/// Bounds on what a node may send back: a ServiceAccount token is a JWT of about 1 KiB, a CA
/// bundle a few certificates.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
pub const MAX_CA_LEN: usize = 64 * 1024;
pub const MAX_URL_LEN: usize = 1024;

/// One RBAC rule: `verbs` on `resources` of `api_group` ("" is the core group).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub api_group: &'static str,
    pub resources: &'static [&'static str],
    pub verbs: &'static [&'static str],
}

/// Everything the coordinator does on the host cluster, and nothing more: tenants' namespaces and
/// HelmCharts (created, applied, deleted), the install Jobs and vCluster StatefulSets it reads to
/// tell a tenant Ready, Nodes' labels and taints, and Pods (read and watched, for pod ownership).
pub const COORDINATOR_RULES: &[Rule] = &[
    Rule { api_group: "", resources: &["namespaces"], verbs: &["get", "list", "watch", "create", "patch", "delete"] },
    Rule {
        api_group: "helm.cattle.io",
        resources: &["helmcharts"],
        verbs: &["get", "list", "watch", "create", "patch", "delete"],
    },
    Rule { api_group: "", resources: &["nodes"], verbs: &["get", "list", "watch", "patch"] },
    Rule { api_group: "", resources: &["pods"], verbs: &["get", "list", "watch"] },
    Rule { api_group: "batch", resources: &["jobs"], verbs: &["get"] },
    Rule { api_group: "apps", resources: &["statefulsets"], verbs: &["get"] },
];

/// What a `server` node sends back: the address its K3s serves the API on as its admin kubeconfig
/// names it (the coordinator keeps only the scheme and port, and puts the address the node's link
/// comes from in front), the cluster's CA, and the ServiceAccount's token.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct HostAccess {
    pub server_url: String,
    pub ca_pem: String,
    pub token: String,
}

impl std::fmt::Debug for HostAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostAccess")
            .field("server_url", &self.server_url)
            .field("ca_pem_len", &self.ca_pem.len())
            .field("token", &"<redacted>")
            .finish()
    }
}

/// The ServiceAccount, its ClusterRole and binding, and its token Secret, in the order they are
/// applied.
pub fn manifests() -> Vec<Value> {
    let rules: Vec<Value> = COORDINATOR_RULES
        .iter()
        .map(|rule| json!({"apiGroups": [rule.api_group], "resources": rule.resources, "verbs": rule.verbs}))
        .collect();
    let labels = json!({"app.kubernetes.io/managed-by": FIELD_MANAGER, "app.kubernetes.io/part-of": "hexabase"});
    vec![
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": SERVICE_ACCOUNT, "namespace": NAMESPACE, "labels": labels},
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": CLUSTER_ROLE, "labels": labels},
            "rules": rules,
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": CLUSTER_ROLE, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": CLUSTER_ROLE},
            "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}],
        }),
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/service-account-token",
            "metadata": {
                "name": TOKEN_SECRET,
                "namespace": NAMESPACE,
                "labels": labels,
                "annotations": {"kubernetes.io/service-account.name": SERVICE_ACCOUNT},
            },
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_role_grants_exactly_the_rules_and_the_binding_names_the_account() {
        let objects = manifests();
        let kinds: Vec<&str> = objects.iter().map(|o| o["kind"].as_str().unwrap_or_default()).collect();
        assert_eq!(kinds, ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Secret"]);
        let rules = objects[1]["rules"].as_array().cloned().unwrap_or_default();
        assert_eq!(rules.len(), COORDINATOR_RULES.len());
        // Nothing that reads secrets or grants more rights.
        let text = objects[1].to_string();
        for forbidden in ["secrets", "\"*\"", "escalate", "bind", "impersonate", "clusterroles"] {
            assert!(!text.contains(forbidden), "{forbidden} in {text}");
        }
        assert_eq!(objects[2]["subjects"][0]["name"], SERVICE_ACCOUNT);
        assert_eq!(objects[3]["metadata"]["annotations"]["kubernetes.io/service-account.name"], SERVICE_ACCOUNT);
        let access = HostAccess { server_url: "https://x:6443".into(), ca_pem: "ca".into(), token: "s3cret".into() };
        assert!(!format!("{access:?}").contains("s3cret"));
    }
}

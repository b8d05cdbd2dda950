//! Who a request is and what it may do, as an API server with the RBAC authorizer decides it
//! (Kubernetes docs: "Authenticating" (service account tokens), "Using RBAC Authorization"), and
//! the token controller that fills `kubernetes.io/service-account-token` Secrets.
//!
//! A request with `Authorization: Bearer <token>` is the ServiceAccount whose token Secret holds
//! that token, or is refused 401; a ServiceAccount may do only what a ClusterRole bound to it by a
//! ClusterRoleBinding grants (403 otherwise, with the API server's message). A request without
//! credentials acts as the cluster's admin, as a kubeconfig with the admin's client certificate
//! does (the server is plain HTTP: there are no client certificates to check).

use base64::Engine;
use serde_json::{Value, json};

use super::errors::ApiError;
use super::http::Req;
use super::store::{Key, State, Sub};
use super::types::{ResourceDef, Verb};

/// The Secret type the token controller fills.
pub const SERVICE_ACCOUNT_TOKEN_TYPE: &str = "kubernetes.io/service-account-token";
/// The annotation naming the Secret's ServiceAccount.
pub const SERVICE_ACCOUNT_NAME_ANNOTATION: &str = "kubernetes.io/service-account.name";
const TOKEN_CONTROLLER: &str = "kube-controller-manager";

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum User {
    Admin,
    ServiceAccount { namespace: String, name: String },
}

impl User {
    fn username(&self) -> String {
        match self {
            User::Admin => "system:admin".into(),
            User::ServiceAccount { namespace, name } => format!("system:serviceaccount:{namespace}:{name}"),
        }
    }
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text.as_bytes())
}

fn decoded(value: &Value) -> Option<String> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(value.as_str()?).ok()?;
    String::from_utf8(bytes).ok()
}

impl State {
    /// The user a request authenticates as; 401 for a bearer token no ServiceAccount holds.
    pub(super) fn authenticate(&self, req: &Req) -> Result<User, ApiError> {
        let Some(token) = req.bearer.as_deref() else { return Ok(User::Admin) };
        self.of_kind("", "secrets")
            .filter(|(_, s)| s.obj["type"] == SERVICE_ACCOUNT_TOKEN_TYPE)
            .find(|(_, s)| decoded(&s.obj["data"]["token"]).as_deref() == Some(token))
            .and_then(|(key, s)| {
                let name = s.obj["metadata"]["annotations"][SERVICE_ACCOUNT_NAME_ANNOTATION].as_str()?;
                // A token outlives neither its ServiceAccount nor its Secret.
                self.objects
                    .contains_key(&Key::of("", "serviceaccounts", &key.namespace, name))
                    .then(|| User::ServiceAccount { namespace: key.namespace.clone(), name: name.to_string() })
            })
            .ok_or_else(|| ApiError::new(401, "Unauthorized", "Unauthorized"))
    }

    /// 403 unless `user` may `verb` the resource (`def`, subresource `sub`) in `namespace`.
    pub(super) fn authorize(
        &self,
        user: &User,
        verb: Verb,
        def: &ResourceDef,
        sub: Sub,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<(), ApiError> {
        let User::ServiceAccount { namespace: sa_namespace, name: sa_name } = user else { return Ok(()) };
        let resource = match sub {
            Sub::Main => def.plural.clone(),
            Sub::Status => format!("{}/status", def.plural),
            Sub::Finalize => format!("{}/finalize", def.plural),
        };
        let verb_name = verb.as_str();
        let bound = self.of_kind("rbac.authorization.k8s.io", "clusterrolebindings").filter(|(_, binding)| {
            binding.obj["subjects"].as_array().is_some_and(|subjects| {
                subjects.iter().any(|s| {
                    s["kind"] == "ServiceAccount"
                        && s["name"] == sa_name.as_str()
                        && s["namespace"] == sa_namespace.as_str()
                })
            }) && binding.obj["roleRef"]["kind"] == "ClusterRole"
        });
        let allowed = bound.into_iter().any(|(_, binding)| {
            let role = binding.obj["roleRef"]["name"].as_str().unwrap_or_default();
            let Some(role) = self.objects.get(&Key::of("rbac.authorization.k8s.io", "clusterroles", "", role)) else {
                return false;
            };
            role.obj["rules"].as_array().is_some_and(|rules| {
                rules.iter().any(|rule| {
                    let has = |field: &str, want: &str| {
                        rule[field].as_array().is_some_and(|l| l.iter().any(|v| v == want || v == "*"))
                    };
                    has("apiGroups", &def.group)
                        && has("resources", &resource)
                        && has("verbs", verb_name)
                        && rule["resourceNames"]
                            .as_array()
                            .is_none_or(|names| names.is_empty() || names.iter().any(|n| n == name))
                })
            })
        });
        if allowed {
            return Ok(());
        }
        let target =
            if name.is_empty() { def.group_resource() } else { format!("{} \"{name}\"", def.group_resource()) };
        let scope = match namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".into(),
        };
        Err(ApiError::new(
            403,
            "Forbidden",
            format!(
                "{target} is forbidden: User \"{}\" cannot {verb_name} resource \"{resource}\" in API group \"{}\" {scope}",
                user.username(),
                def.group
            ),
        )
        .with_details(json!({"name": name, "group": def.group, "kind": def.plural})))
    }

    /// The token controller: every token Secret of an existing ServiceAccount gets a token, the
    /// cluster's CA and its namespace.
    pub(super) fn fill_service_account_tokens(&mut self) {
        let unfilled: Vec<Key> = self
            .of_kind("", "secrets")
            .filter(|(_, s)| s.obj["type"] == SERVICE_ACCOUNT_TOKEN_TYPE && s.obj["data"]["token"].is_null())
            .filter(|(key, s)| {
                s.obj["metadata"]["annotations"][SERVICE_ACCOUNT_NAME_ANNOTATION]
                    .as_str()
                    .is_some_and(|sa| self.objects.contains_key(&Key::of("", "serviceaccounts", &key.namespace, sa)))
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in unfilled {
            let token: String = (0..4).map(|_| format!("{:016x}", self.rand())).collect();
            let (ca, namespace) = (b64(&self.cluster_ca_pem), b64(&key.namespace));
            self.internal_update(&key, TOKEN_CONTROLLER, Sub::Main, |secret| {
                secret["data"] = json!({"token": b64(&format!("fake.{token}")), "ca.crt": ca, "namespace": namespace});
            });
        }
    }
}

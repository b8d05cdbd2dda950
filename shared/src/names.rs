//! Node pools and the naming rules both the agent and the coordinator enforce.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest tenant name: the tenant becomes namespace `hx-<tenant>` and label keys
/// `tenant.hexabase.ai/<tenant>`, and must leave room in both.
pub const MAX_TENANT_NAME: usize = 40;
/// Longest node name (a DNS label, as Kubernetes node names are here).
pub const MAX_NODE_NAME: usize = 63;
/// Prefix of a tenant's namespace on the host cluster (see [`tenant_namespace`]).
pub const TENANT_NAMESPACE_PREFIX: &str = "hx-";
/// Prefix of the per-tenant node label key (see [`tenant_label`]).
pub const TENANT_LABEL_PREFIX: &str = "tenant.hexabase.ai/";

/// The host namespace of a tenant's vCluster: `hx-<tenant>`.
pub fn tenant_namespace(tenant: &str) -> String {
    format!("{TENANT_NAMESPACE_PREFIX}{tenant}")
}

/// The tenant whose host namespace is `namespace`, if it is one (`hx-<valid tenant name>`).
pub fn tenant_of_namespace(namespace: &str) -> Option<&str> {
    namespace.strip_prefix(TENANT_NAMESPACE_PREFIX).filter(|tenant| validate_tenant_name(tenant).is_ok())
}

/// Label key that marks a node as holding a share of `tenant` (or as dedicated to it):
/// `tenant.hexabase.ai/<tenant>`.
pub fn tenant_label(tenant: &str) -> String {
    format!("{TENANT_LABEL_PREFIX}{tenant}")
}

/// The pool a node joins; a bootstrap token names it and the node keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pool {
    /// Runs the K3s server (control plane of the host cluster).
    Server,
    /// Hosts many tenants' vClusters side by side.
    Shared,
    /// Belongs to one tenant on the dedicated plan.
    Dedicated { tenant: String },
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pool::Server => f.write_str("server"),
            Pool::Shared => f.write_str("shared"),
            Pool::Dedicated { tenant } => write!(f, "dedicated:{tenant}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("unknown pool {0:?}: use server, shared or dedicated:<tenant>")]
    UnknownPool(String),
    #[error("{kind} name {name:?} is invalid: {why}")]
    Invalid { kind: &'static str, name: String, why: &'static str },
}

impl FromStr for Pool {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "server" => Ok(Pool::Server),
            "shared" => Ok(Pool::Shared),
            _ => match s.strip_prefix("dedicated:") {
                Some(tenant) => {
                    validate_tenant_name(tenant)?;
                    Ok(Pool::Dedicated { tenant: tenant.to_string() })
                }
                None => Err(NameError::UnknownPool(s.to_string())),
            },
        }
    }
}

impl Serialize for Pool {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Pool {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn validate_dns_label(kind: &'static str, name: &str, max: usize) -> Result<(), NameError> {
    let invalid = |why| Err(NameError::Invalid { kind, name: name.to_string(), why });
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name.len() > max {
        return invalid(if max == MAX_TENANT_NAME {
            "it is longer than 40 characters"
        } else {
            "it is longer than 63 characters"
        });
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return invalid("only lowercase letters, digits and '-' are allowed");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return invalid("it must start and end with a letter or digit");
    }
    Ok(())
}

/// A node name is a DNS label of at most 63 characters.
pub fn validate_node_name(name: &str) -> Result<(), NameError> {
    validate_dns_label("node", name, MAX_NODE_NAME)
}

/// A tenant name is a DNS label of at most 40 characters.
pub fn validate_tenant_name(name: &str) -> Result<(), NameError> {
    validate_dns_label("tenant", name, MAX_TENANT_NAME)
}

/// Turns a hostname into a usable node name: lowercase, first label only, invalid characters
/// replaced by '-', trimmed to 63 characters. Returns `None` when nothing usable is left.
pub fn node_name_from_hostname(hostname: &str) -> Option<String> {
    let first = hostname.split('.').next().unwrap_or_default().to_ascii_lowercase();
    let mapped: String = first
        .chars()
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { '-' })
        .take(MAX_NODE_NAME)
        .collect();
    let trimmed = mapped.trim_matches('-').to_string();
    validate_node_name(&trimmed).ok().map(|_| trimmed)
}

#[cfg(test)]
pub(crate) mod strategies {
    use super::*;
    use proptest::prelude::*;

    pub fn pool() -> impl Strategy<Value = Pool> {
        prop_oneof![
            Just(Pool::Server),
            Just(Pool::Shared),
            "[a-z][a-z0-9]{0,10}".prop_map(|tenant| Pool::Dedicated { tenant }),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_parse_and_print() {
        for text in ["server", "shared", "dedicated:acme"] {
            assert_eq!(text.parse::<Pool>().unwrap().to_string(), text);
        }
        assert_eq!("dedicated".parse::<Pool>(), Err(NameError::UnknownPool("dedicated".into())));
        assert!("dedicated:".parse::<Pool>().is_err());
        assert!("dedicated:Acme".parse::<Pool>().is_err());
        assert!("gpu".parse::<Pool>().unwrap_err().to_string().contains("server, shared or dedicated:<tenant>"));
    }

    #[test]
    fn names_follow_dns_label_rules() {
        let table: &[(&str, bool)] = &[
            ("node-1", true),
            ("a", true),
            ("-a", false),
            ("a-", false),
            ("A", false),
            ("a_b", false),
            ("", false),
            (&"a".repeat(63), true),
            (&"a".repeat(64), false),
        ];
        for (name, ok) in table {
            assert_eq!(validate_node_name(name).is_ok(), *ok, "{name}");
        }
        assert!(validate_tenant_name(&"t".repeat(40)).is_ok());
        assert!(validate_tenant_name(&"t".repeat(41)).unwrap_err().to_string().contains("40"));
    }

    #[test]
    fn tenant_namespaces_and_labels() {
        assert_eq!(tenant_namespace("acme"), "hx-acme");
        assert_eq!(tenant_of_namespace("hx-acme"), Some("acme"));
        assert_eq!(tenant_of_namespace(&tenant_namespace(&"t".repeat(40))), Some("t".repeat(40).as_str()));
        for not_a_tenant in ["hx-", "hx-Bad_Name", "kube-system", "acme"] {
            assert_eq!(tenant_of_namespace(not_a_tenant), None, "{not_a_tenant}");
        }
        assert_eq!(tenant_label("acme"), "tenant.hexabase.ai/acme");
        // Both must stay valid Kubernetes names for the longest tenant name.
        assert!(tenant_namespace(&"t".repeat(MAX_TENANT_NAME)).len() <= 63);
        assert!(tenant_label(&"t".repeat(MAX_TENANT_NAME)).split_once('/').unwrap().1.len() <= 63);
    }

    #[test]
    fn hostnames_become_node_names() {
        assert_eq!(node_name_from_hostname("Worker_01.example.com").as_deref(), Some("worker-01"));
        assert_eq!(node_name_from_hostname("---"), None);
        assert_eq!(node_name_from_hostname(""), None);
    }
}

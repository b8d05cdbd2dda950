//! The K3s part of a node's desired state, and the K3s state an agent reports.
//!
//! The coordinator decides the role (the pool of the node's bootstrap token: `server` nodes run the
//! server, the first of them initialises the cluster), the pinned version and the node's labels,
//! taints and kubelet reservations. The agent turns a [`K3sSpec`] into a running K3s the way K3s'
//! own installer would, and answers with a [`K3sState`] in every report.
//!
//! These types travel over the wire in bincode (a format that is not self-describing), so no
//! `skip_serializing_if`, `flatten` or internally tagged enums here; `#[serde(default)]` only
//! serves hand-written JSON specs (`hexa-agent apply --spec FILE`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::names::validate_node_name;
use crate::spec::Taint;

/// The K3s release a node runs unless its spec pins another one.
pub const DEFAULT_VERSION: &str = "v1.35.5+k3s1";
/// Where K3s publishes its releases: `<base>/<version>/k3s` and `<base>/<version>/sha256sum-amd64.txt`.
pub const DEFAULT_RELEASE_BASE: &str = "https://github.com/k3s-io/k3s/releases/download";

fn default_version() -> String {
    DEFAULT_VERSION.to_string()
}

/// What the coordinator wants K3s on one node to be.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct K3sSpec {
    pub role: K3sRole,
    /// The cluster's join token. Required to join (agents, servers with `server_url`); optional for
    /// the server that initialises the cluster, which then uses it as the cluster's token.
    #[serde(default)]
    pub token: Option<JoinToken>,
    /// Servers only: the separate token agents join with (K3s' `agent-token`). Unlike the server
    /// token it does not open `/v1-k3s/server-bootstrap`, where the cluster's CA keys are served,
    /// so a K3s agent node never holds the keys to the cluster.
    #[serde(default)]
    pub agent_token: Option<JoinToken>,
    /// A K3s release tag, e.g. `v1.35.5+k3s1`.
    #[serde(default = "default_version")]
    pub version: String,
    /// Kubernetes node name to register as (K3s' `node-name`); the hostname when absent.
    #[serde(default)]
    pub node_name: Option<String>,
    /// Labels K3s puts on the Node when it registers (`node-label`).
    #[serde(default)]
    pub node_labels: BTreeMap<String, String>,
    /// Taints K3s puts on the Node when it registers (`node-taint`).
    #[serde(default)]
    pub node_taints: Vec<Taint>,
    /// Extra kubelet flags without their leading dashes, e.g. `system-reserved` ->
    /// `cpu=500m,memory=1Gi`, `eviction-hard` -> `memory.available<500Mi` (`kubelet-arg`).
    #[serde(default)]
    pub kubelet_args: BTreeMap<String, String>,
    /// Append a random suffix to the node name (`with-node-id`): for re-imaged dedicated nodes whose
    /// hostname an earlier incarnation already registered.
    #[serde(default)]
    pub with_node_id: bool,
    /// Environment of the K3s service (its `.env` file): `K3S_*`, `CONTAINERD_*` and
    /// `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY`, as K3s' installer keeps them.
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    #[serde(default)]
    pub action: K3sAction,
    #[serde(default)]
    pub artifacts: ArtifactSource,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum K3sRole {
    /// A K3s server. `cluster_init` starts a new embedded-etcd cluster; `server_url` joins an
    /// existing one; neither runs a single server on its own datastore.
    Server {
        #[serde(default)]
        cluster_init: bool,
        #[serde(default)]
        server_url: Option<String>,
    },
    /// A K3s agent joining the server at `server_url` (`https://HOST:6443`).
    Agent { server_url: String },
}

/// Server or agent, without the details: what decides the unit name and whether a change of role
/// needs a reinstall.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum RoleKind {
    Server,
    Agent,
}

impl fmt::Display for RoleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RoleKind::Server => "server",
            RoleKind::Agent => "agent",
        })
    }
}

impl K3sRole {
    pub fn kind(&self) -> RoleKind {
        match self {
            K3sRole::Server { .. } => RoleKind::Server,
            K3sRole::Agent { .. } => RoleKind::Agent,
        }
    }

    /// The server this node joins, if it joins one.
    pub fn server_url(&self) -> Option<&str> {
        match self {
            K3sRole::Server { server_url, .. } => server_url.as_deref(),
            K3sRole::Agent { server_url } => Some(server_url),
        }
    }
}

/// What to do with K3s on the node.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum K3sAction {
    /// Install, upgrade or reconfigure to match the spec; refuse to change the role.
    #[default]
    Install,
    /// As `Install`, and replace an installation of the other role if there is one.
    Reinstall,
    /// Stop K3s and remove what the agent installed.
    Uninstall,
}

/// Where the K3s binary and its checksum file come from.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactSource {
    /// A server with K3s' release layout: `<base>/<version>/k3s<arch suffix>` and
    /// `<base>/<version>/sha256sum-<arch>.txt`. With `sha256` (pinned by the operator) the binary
    /// is checked against it and the checksum file is not used.
    Url {
        base: String,
        #[serde(default)]
        sha256: Option<String>,
    },
    /// A directory on the node with the same layout: `<dir>/<version>/k3s`,
    /// `<dir>/<version>/sha256sum-amd64.txt`.
    AirGap { dir: PathBuf },
}

impl Default for ArtifactSource {
    fn default() -> Self {
        ArtifactSource::Url { base: DEFAULT_RELEASE_BASE.to_string(), sha256: None }
    }
}

/// The cluster's join token. A secret: `Debug` never shows it, and nothing should log it.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
#[serde(transparent)]
pub struct JoinToken(String);

impl JoinToken {
    pub fn new(token: impl Into<String>) -> JoinToken {
        JoinToken(token.into())
    }

    /// The token itself, for the one place that writes it (the K3s config file, mode 0600).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinToken(<redacted>)")
    }
}

/// K3s on a node, as the agent reports it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum K3sState {
    #[default]
    NotInstalled,
    /// Installed and started; the node's Node object is not Ready yet.
    Installing,
    /// The Node object is Ready. On a server, `cluster_ca_sha256` is the sha256 (hex) of the
    /// cluster's server CA certificate as K3s keeps it on disk: the hash secure join tokens
    /// (`K10<hash>::...`) pin.
    Running {
        version: String,
        #[serde(default)]
        cluster_ca_sha256: Option<String>,
    },
    /// The last apply failed, or the service is down; `reason` says why and what to do.
    Failed { reason: String },
}

impl fmt::Display for K3sState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            K3sState::NotInstalled => f.write_str("not installed"),
            K3sState::Installing => f.write_str("installing"),
            K3sState::Running { version, .. } => write!(f, "running {version}"),
            K3sState::Failed { reason } => write!(f, "failed: {reason}"),
        }
    }
}

/// Why a spec cannot be applied. Every message names the field and value at fault and what to write
/// instead; none contains the join token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum K3sSpecError {
    #[error(
        "k3s version {0:?} is not a K3s release tag: expected the form {DEFAULT_VERSION} \
         (see https://github.com/k3s-io/k3s/releases)"
    )]
    BadVersion(String),
    #[error("a K3s {role} that joins a cluster needs the cluster's join token: set `token`")]
    MissingToken { role: RoleKind },
    #[error("the join token {0}; use the token of the cluster's first server (its /var/lib/rancher/k3s/server/token)")]
    BadToken(&'static str),
    #[error("only a K3s server takes an `agent_token`; an agent joins with `token` alone")]
    AgentTokenOnAgent,
    #[error("server URL {url:?} {why}: expected https://HOST:6443, the address of a K3s server")]
    BadServerUrl { url: String, why: &'static str },
    #[error(
        "a server cannot both initialise a cluster (cluster_init) and join one (server_url {0:?}): \
         keep cluster_init for the first server only"
    )]
    InitAndJoin(String),
    #[error("node name {name:?} is invalid: {why}")]
    BadNodeName { name: String, why: String },
    #[error("node label {key:?}={value:?} is not a valid Kubernetes label: {why}")]
    BadLabel { key: String, value: String, why: String },
    #[error("node taint {taint:?} is not valid: {why}")]
    BadTaint { taint: String, why: String },
    #[error("kubelet argument {name:?}={value:?} {why}")]
    BadKubeletArg { name: String, value: String, why: &'static str },
    #[error("environment variable {key:?} {why}")]
    BadEnvironment { key: String, why: &'static str },
    #[error("artifact base URL {base:?} {why}: expected http(s)://HOST/PATH laid out like {DEFAULT_RELEASE_BASE}")]
    BadArtifactBase { base: String, why: &'static str },
    #[error("pinned K3s checksum {0:?} is not a sha256 in lowercase hex (64 characters)")]
    BadArtifactPin(String),
    #[error("air-gap directory {0:?} must be an absolute path on the node")]
    RelativeAirGapDir(PathBuf),
}

impl K3sSpec {
    /// A spec with the defaults and `role`.
    pub fn new(role: K3sRole) -> K3sSpec {
        K3sSpec {
            role,
            token: None,
            agent_token: None,
            version: default_version(),
            node_name: None,
            node_labels: BTreeMap::new(),
            node_taints: Vec::new(),
            kubelet_args: BTreeMap::new(),
            with_node_id: false,
            environment: BTreeMap::new(),
            action: K3sAction::Install,
            artifacts: ArtifactSource::default(),
        }
    }

    /// Checks everything a person could get wrong, before anything on the node is touched.
    /// An `Uninstall` spec needs nothing else to be right.
    pub fn validate(&self) -> Result<(), K3sSpecError> {
        if self.action == K3sAction::Uninstall {
            return Ok(());
        }
        validate_version(&self.version)?;
        match &self.role {
            K3sRole::Server { cluster_init: true, server_url: Some(url) } => {
                return Err(K3sSpecError::InitAndJoin(url.clone()));
            }
            role => {
                if let Some(url) = role.server_url() {
                    validate_server_url(url)?;
                    if self.token.is_none() {
                        return Err(K3sSpecError::MissingToken { role: role.kind() });
                    }
                }
            }
        }
        if let Some(token) = &self.token {
            validate_token(token.expose())?;
        }
        if let Some(token) = &self.agent_token {
            if self.role.kind() != RoleKind::Server {
                return Err(K3sSpecError::AgentTokenOnAgent);
            }
            validate_token(token.expose())?;
        }
        if let Some(name) = &self.node_name {
            validate_node_name(name)
                .map_err(|e| K3sSpecError::BadNodeName { name: name.clone(), why: e.to_string() })?;
        }
        for (key, value) in &self.node_labels {
            if let Some(why) = key_value_problem(key, value) {
                return Err(K3sSpecError::BadLabel { key: key.clone(), value: value.clone(), why });
            }
        }
        for taint in &self.node_taints {
            if let Some(why) = key_value_problem(&taint.key, &taint.value) {
                return Err(K3sSpecError::BadTaint { taint: taint.to_string(), why });
            }
        }
        for (name, value) in &self.kubelet_args {
            validate_kubelet_arg(name, value)?;
        }
        for (key, value) in &self.environment {
            validate_environment(key, value)?;
        }
        match &self.artifacts {
            ArtifactSource::Url { sha256: Some(pin), .. } if !is_sha256_hex(pin) => {
                Err(K3sSpecError::BadArtifactPin(pin.clone()))
            }
            ArtifactSource::Url { base, .. } => validate_artifact_base(base),
            ArtifactSource::AirGap { dir } if !dir.is_absolute() => Err(K3sSpecError::RelativeAirGapDir(dir.clone())),
            ArtifactSource::AirGap { .. } => Ok(()),
        }
    }
}

/// Whether `hash` is a sha256 written as K3s and `sha256sum` write it: 64 lowercase hex digits.
pub fn is_sha256_hex(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn validate_version(version: &str) -> Result<(), K3sSpecError> {
    let bad = || K3sSpecError::BadVersion(version.to_string());
    let rest = version.strip_prefix('v').ok_or_else(bad)?;
    let (core, build) = rest.split_once('+').ok_or_else(bad)?;
    let (numbers, pre) = match core.split_once('-') {
        Some((numbers, pre)) => (numbers, Some(pre)),
        None => (core, None),
    };
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let parts: Vec<&str> = numbers.split('.').collect();
    let pre_ok = pre.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.'));
    let build_ok = build.strip_prefix("k3s").is_some_and(numeric);
    if parts.len() == 3 && parts.iter().all(|p| numeric(p)) && pre_ok && build_ok { Ok(()) } else { Err(bad()) }
}

fn validate_server_url(url: &str) -> Result<(), K3sSpecError> {
    let bad = |why| K3sSpecError::BadServerUrl { url: url.to_string(), why };
    let rest = url.strip_prefix("https://").ok_or_else(|| bad("does not start with https://"))?;
    let host_port = rest.split('/').next().unwrap_or_default();
    if host_port.is_empty() || host_port.starts_with(':') {
        return Err(bad("names no host"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control() || c == '"') {
        return Err(bad("contains whitespace, quotes or control characters"));
    }
    Ok(())
}

fn validate_token(token: &str) -> Result<(), K3sSpecError> {
    if token.is_empty() {
        return Err(K3sSpecError::BadToken("is empty"));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(K3sSpecError::BadToken("contains whitespace or control characters"));
    }
    Ok(())
}

/// Why `value` is not a Kubernetes label value (at most 63 characters of `[A-Za-z0-9-_.]`,
/// beginning and ending with an alphanumeric), or `None` when it is one.
fn label_value_problem(value: &str) -> Option<&'static str> {
    if value.len() > 63 {
        Some("is longer than 63 characters")
    } else if !value.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        Some("has characters other than letters, digits, '-', '_' and '.'")
    } else if !value.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        || !value.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
    {
        Some("does not begin and end with a letter or digit")
    } else {
        None
    }
}

/// Why `key` is not a Kubernetes label key (`[prefix/]name`: a DNS subdomain prefix and a name
/// with the rules of a value), or `None` when it is one.
fn label_key_problem(key: &str) -> Option<String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if prefix.is_empty() || prefix.len() > 253 || !prefix.split('.').all(label_ok) {
            return Some("the key's prefix before '/' is not a lowercase DNS name such as hexabase.ai".to_string());
        }
    }
    if name.is_empty() {
        return Some("the key's name part is empty".to_string());
    }
    label_value_problem(name).map(|why| format!("the key's name part {why}"))
}

/// Why a label or taint `key`/`value` pair is invalid, or `None`.
fn key_value_problem(key: &str, value: &str) -> Option<String> {
    label_key_problem(key).or_else(|| label_value_problem(value).map(|why| format!("the value {why}")))
}

fn validate_kubelet_arg(name: &str, value: &str) -> Result<(), K3sSpecError> {
    let bad = |why| K3sSpecError::BadKubeletArg { name: name.to_string(), value: value.to_string(), why };
    if name.starts_with('-') {
        return Err(bad("is written with leading dashes: write the flag name without them, e.g. system-reserved"));
    }
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err(bad("has a name that is not a kubelet flag name (lowercase letters, digits and '-')"));
    }
    if value.is_empty() {
        return Err(bad("has no value: give the flag's value, e.g. cpu=500m,memory=1Gi"));
    }
    if value.chars().any(char::is_control) {
        return Err(bad("has control characters (such as a newline) in its value"));
    }
    Ok(())
}

fn validate_environment(key: &str, value: &str) -> Result<(), K3sSpecError> {
    let bad = |why| Err(K3sSpecError::BadEnvironment { key: key.to_string(), why });
    let proxy = ["HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"].iter().any(|p| p.eq_ignore_ascii_case(key));
    let prefixed = ["K3S_", "CONTAINERD_"].iter().any(|p| key.len() > p.len() && key.starts_with(p));
    if !proxy && !prefixed {
        return bad("is not one K3s reads: use K3S_*, CONTAINERD_*, HTTP_PROXY, HTTPS_PROXY or NO_PROXY");
    }
    if !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return bad("may only contain letters, digits and '_'");
    }
    if value.chars().any(char::is_control) {
        return bad("has control characters (such as a newline) in its value");
    }
    Ok(())
}

fn validate_artifact_base(base: &str) -> Result<(), K3sSpecError> {
    let bad = |why| Err(K3sSpecError::BadArtifactBase { base: base.to_string(), why });
    let Some(rest) = base.strip_prefix("https://").or_else(|| base.strip_prefix("http://")) else {
        return bad("does not start with http:// or https://");
    };
    if rest.split('/').next().unwrap_or_default().is_empty() {
        return bad("names no host");
    }
    if base.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("contains whitespace or control characters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::TaintEffect;

    fn agent() -> K3sSpec {
        K3sSpec {
            token: Some(JoinToken::new("K10abc::server:s3cret")),
            ..K3sSpec::new(K3sRole::Agent { server_url: "https://10.0.0.1:6443".into() })
        }
    }

    #[test]
    fn debug_never_shows_the_token() {
        let spec = agent();
        let printed = format!("{spec:?} {:?}", spec.token);
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains("JoinToken(<redacted>)"));
        // Errors about the token do not quote it either.
        let bad = K3sSpec { token: Some(JoinToken::new("s3cret with space")), ..agent() };
        let err = bad.validate().unwrap_err().to_string();
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn a_minimal_json_spec_gets_the_defaults() {
        let spec: K3sSpec = serde_json::from_str(r#"{"role": {"server": {"cluster_init": true}}}"#).unwrap();
        assert_eq!(spec, K3sSpec::new(K3sRole::Server { cluster_init: true, server_url: None }));
        assert_eq!(spec.version, "v1.35.5+k3s1");
        assert_eq!(
            spec.artifacts,
            ArtifactSource::Url { base: "https://github.com/k3s-io/k3s/releases/download".into(), sha256: None }
        );
        assert_eq!(spec.action, K3sAction::Install);
        spec.validate().unwrap();

        let json = r#"{"role": {"agent": {"server_url": "https://s:6443"}}, "token": "t", "action": "uninstall",
                       "artifacts": {"air_gap": {"dir": "/srv/k3s"}}}"#;
        let spec: K3sSpec = serde_json::from_str(json).unwrap();
        assert_eq!(spec.token.as_ref().map(JoinToken::expose), Some("t"));
        assert_eq!(spec.action, K3sAction::Uninstall);
        assert_eq!(spec.artifacts, ArtifactSource::AirGap { dir: "/srv/k3s".into() });
    }

    #[test]
    fn specs_and_states_survive_json_and_bincode() {
        let mut spec = agent();
        spec.node_labels.insert("hexabase.ai/pool".into(), "dedicated".into());
        spec.node_taints.push(Taint {
            key: "hexabase.ai/dedicated".into(),
            value: "acme".into(),
            effect: TaintEffect::NoSchedule,
        });
        spec.kubelet_args.insert("system-reserved".into(), "cpu=500m,memory=1Gi".into());
        spec.with_node_id = true;
        let config = bincode::config::standard().with_limit::<65536>();
        let bytes = bincode::serde::encode_to_vec(&spec, config).unwrap();
        let (back, used): (K3sSpec, usize) = bincode::serde::decode_from_slice(&bytes, config).unwrap();
        assert_eq!((back, used), (spec.clone(), bytes.len()));
        assert_eq!(serde_json::from_str::<K3sSpec>(&serde_json::to_string(&spec).unwrap()).unwrap(), spec);

        for state in [
            K3sState::NotInstalled,
            K3sState::Installing,
            K3sState::Running { version: DEFAULT_VERSION.into(), cluster_ca_sha256: Some("ab".repeat(32)) },
            K3sState::Failed { reason: "checksum mismatch".into() },
        ] {
            let bytes = bincode::serde::encode_to_vec(&state, config).unwrap();
            let (back, _): (K3sState, usize) = bincode::serde::decode_from_slice(&bytes, config).unwrap();
            assert_eq!(back, state);
        }
    }

    #[test]
    fn validation_names_what_is_wrong() {
        let server = |cluster_init, server_url: Option<&str>| K3sSpec {
            token: Some(JoinToken::new("t")),
            ..K3sSpec::new(K3sRole::Server { cluster_init, server_url: server_url.map(str::to_string) })
        };
        let with = |f: &dyn Fn(&mut K3sSpec)| {
            let mut spec = agent();
            f(&mut spec);
            spec
        };
        let cases: Vec<(K3sSpec, &str)> = vec![
            (with(&|s| s.version = "1.35.5".into()), "expected the form v1.35.5+k3s1"),
            (with(&|s| s.version = "v1.35+k3s1".into()), "not a K3s release tag"),
            (with(&|s| s.version = "v1.35.5+k3s1/../x".into()), "not a K3s release tag"),
            (with(&|s| s.token = None), "K3s agent that joins a cluster needs the cluster's join token"),
            (with(&|s| s.token = Some(JoinToken::new(""))), "join token is empty"),
            (with(&|s| s.role = K3sRole::Agent { server_url: "http://s:6443".into() }), "does not start with https://"),
            (with(&|s| s.role = K3sRole::Agent { server_url: "https://:6443".into() }), "names no host"),
            (server(true, Some("https://s:6443")), "cannot both initialise a cluster"),
            (K3sSpec { token: None, ..server(false, Some("https://s:6443")) }, "K3s server that joins"),
            (with(&|s| s.node_name = Some("Bad_Name".into())), "node name \"Bad_Name\" is invalid"),
            (with(&|s| _ = s.node_labels.insert("bad key".into(), "x".into())), "node label \"bad key\"=\"x\""),
            (with(&|s| _ = s.node_labels.insert("Hexabase.ai/x".into(), "x".into())), "not a lowercase DNS name"),
            (
                with(&|s| _ = s.node_labels.insert("k".into(), "-x".into())),
                "the value does not begin and end with a letter or digit",
            ),
            (
                with(&|s| {
                    s.node_taints.push(Taint { key: "k".into(), value: "a b".into(), effect: TaintEffect::NoExecute })
                }),
                "node taint \"k=a b:NoExecute\" is not valid: the value has characters other than",
            ),
            (
                with(&|s| _ = s.kubelet_args.insert("--system-reserved".into(), "cpu=1".into())),
                "without them, e.g. system-reserved",
            ),
            (with(&|s| _ = s.kubelet_args.insert("eviction-hard".into(), String::new())), "has no value"),
            (with(&|s| _ = s.kubelet_args.insert("x".into(), "a\nb".into())), "control characters"),
            (with(&|s| _ = s.environment.insert("PATH".into(), "/bin".into())), "is not one K3s reads"),
            (with(&|s| _ = s.environment.insert("K3S_X".into(), "a\nb".into())), "control characters"),
            (
                with(&|s| s.artifacts = ArtifactSource::Url { base: "ftp://x".into(), sha256: None }),
                "http:// or https://",
            ),
            (
                with(&|s| s.artifacts = ArtifactSource::Url { base: "http://x".into(), sha256: Some("ABC".into()) }),
                "not a sha256",
            ),
            (with(&|s| s.artifacts = ArtifactSource::AirGap { dir: "k3s".into() }), "must be an absolute path"),
        ];
        for (spec, expected) in cases {
            let err = spec.validate().expect_err(expected).to_string();
            assert!(err.contains(expected), "{err:?} does not contain {expected:?}");
        }
    }

    #[test]
    fn valid_specs_pass() {
        let mut spec = agent();
        spec.node_labels.insert("tenant.hexabase.ai/acme".into(), "true".into());
        spec.node_taints.push(Taint {
            key: "hexabase.ai/dedicated".into(),
            value: String::new(),
            effect: TaintEffect::NoSchedule,
        });
        spec.kubelet_args.insert("eviction-hard".into(), "memory.available<500Mi,nodefs.available<10%".into());
        spec.environment.insert("https_proxy".into(), "http://proxy:3128".into());
        spec.environment.insert("CONTAINERD_LOG_LEVEL".into(), "debug".into());
        spec.version = "v1.36.0-rc1+k3s2".into();
        spec.node_name = Some("node-1".into());
        spec.validate().unwrap();
        K3sSpec::new(K3sRole::Server { cluster_init: false, server_url: None }).validate().unwrap();
        // Uninstalling needs nothing else to be right.
        K3sSpec { action: K3sAction::Uninstall, version: "bogus".into(), ..agent() }.validate().unwrap();
    }

    #[test]
    fn states_read_well() {
        let running = K3sState::Running { version: "v1.35.5+k3s1".into(), cluster_ca_sha256: None };
        assert_eq!(running.to_string(), "running v1.35.5+k3s1");
        assert_eq!(K3sState::NotInstalled.to_string(), "not installed");
        assert_eq!(RoleKind::Agent.to_string(), "agent");
    }
}

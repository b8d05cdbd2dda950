//! `/etc/hexabase/agent.toml`. Every key is optional; `HEXA_<KEY>` (and `HEXA_RESERVED_<KEY>`)
//! override keys from the environment; command-line flags override both.
//! `packaging/agent.toml` documents each key and a test keeps it in step with this struct.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use hexa_shared::logging::LogFormat;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/hexabase/agent.toml";

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Coordinator QUIC address, `HOST:PORT`; coordinators sharing an etcd store: theirs, separated
    /// by commas (or one name with an address per coordinator). The agent links with the one that
    /// answers, which is the leader: the others do not listen.
    pub coordinator: String,
    /// Bootstrap token for the first enrollment; ignored once the node holds a certificate.
    pub token: String,
    /// File holding the bootstrap token, read when `token` is empty (keeps the token out of
    /// `/proc/<pid>/cmdline`).
    pub token_file: PathBuf,
    /// Pin of the coordinator CA, `sha256:<hex>`, as `hexa-coordinator` prints it. Needed to enroll.
    pub ca_hash: String,
    /// Where the node key (0600), certificate, CA and last applied spec live.
    pub state_dir: PathBuf,
    /// Node name to ask for at enrollment; empty means the hostname. The coordinator decides.
    pub node_name: String,
    /// Filesystem whose size is reported as ephemeral storage (K3s keeps pods' data here).
    pub ephemeral_path: PathBuf,
    /// Maximum pods the node accepts (reported as pod capacity).
    pub max_pods: u32,
    /// Memory kept free for the kubelet's hard eviction threshold.
    pub eviction_memory_bytes: u64,
    /// Resources kept for the system and Kubernetes daemons, not offered to tenants.
    pub reserved: Reserved,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// The Proxmox VMID of this machine, as its cloud-init seed gives it; 0: not a Proxmox VM.
    /// With it the agent enrolls with its provider identity (this VMID and the SMBIOS uuid).
    pub proxmox_vmid: u32,
    /// What the firewall needs to know about this node's pod network.
    pub isolation: IsolationConfig,
}

/// `[isolation]`: where this node's pods are attached, as K3s' flannel sets them up.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct IsolationConfig {
    /// The bridge the pods' veths hang on (`cni0` under K3s' flannel). Every packet from it must
    /// carry its pod's own source address; every IPv6 packet from it is dropped.
    pub pod_bridge: String,
    /// libcni's result cache, which says which bridge port each local pod sends from.
    pub cni_results_dir: PathBuf,
    /// The cluster's pod network, for the baseline enforced when the node's last spec cannot be
    /// read: every pod-to-pod connection in it is dropped until the coordinator sends a spec.
    pub baseline_pod_cidr: String,
    /// What the pods of a tenant with no allocation on this node are held to, together.
    pub unknown_tenant: crate::isolation::cgroup::UnknownTenantCap,
}

impl IsolationConfig {
    /// `isolation.baseline_pod_cidr`, parsed.
    pub fn baseline_pod_cidr(&self) -> Result<hexa_shared::isolation::Ipv4Cidr, crate::ConfigError> {
        self.baseline_pod_cidr.parse().map_err(|e| crate::ConfigError::BaselinePodCidr(format!("{e}")))
    }
}

impl Default for IsolationConfig {
    fn default() -> Self {
        IsolationConfig {
            pod_bridge: crate::isolation::firewall::DEFAULT_BRIDGE.to_string(),
            cni_results_dir: PathBuf::from(crate::isolation::local_pods::DEFAULT_CNI_RESULTS_DIR),
            baseline_pod_cidr: "10.42.0.0/16".into(),
            unknown_tenant: Default::default(),
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Reserved {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub ephemeral_bytes: u64,
}

impl Default for Reserved {
    fn default() -> Self {
        Reserved { cpu_millis: 500, memory_bytes: 1 << 30, ephemeral_bytes: 10 << 30 }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            coordinator: "127.0.0.1:7443".into(),
            token: String::new(),
            token_file: PathBuf::new(),
            ca_hash: String::new(),
            state_dir: PathBuf::from("/var/lib/hexabase/agent"),
            node_name: String::new(),
            ephemeral_path: PathBuf::from("/var/lib/rancher"),
            max_pods: 110,
            eviction_memory_bytes: 100 << 20,
            reserved: Reserved::default(),
            log_format: LogFormat::Text,
            proxmox_vmid: 0,
            isolation: IsolationConfig::default(),
        }
    }
}

/// Why the bootstrap token cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error(
        "cannot read the bootstrap token file {path} (token_file): {source}; check the path and that it is readable by the agent"
    )]
    Unreadable { path: PathBuf, source: std::io::Error },
    #[error(
        "the bootstrap token file {path} (token_file) is empty: write the token from `hexactl token create` into it"
    )]
    Empty { path: PathBuf },
}

/// A configuration the agent refuses to start with: the file, the key, and what to write instead.
/// `file` is the configuration file the values came from (flags and `HEXA_*` variables override it).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(
        "config file {file}: coordinator = {value:?} is not HOST:PORT; write the coordinator's QUIC address, \
         e.g. coordinator = \"coord.example:7443\" (several, separated by commas: \"c1:7443,c2:7443\")"
    )]
    Coordinator { file: String, value: String },
    #[error(
        "config file {file}: ca_hash = {value:?} is not sha256:<64 hex digits>; copy the `CA sha256:...` line \
         hexa-coordinator prints at start"
    )]
    CaHash { file: String, value: String },
    #[error(
        "config file {file}: this node is not enrolled yet (no {cert}) and neither token nor token_file is set; \
         write the token from `hexactl token create` into a 0600 file and set token_file to its path"
    )]
    MissingToken { file: String, cert: PathBuf },
    #[error(
        "config file {file}: this node is not enrolled yet (no {cert}) and ca_hash is empty; set ca_hash to the \
         `CA sha256:...` line hexa-coordinator prints at start"
    )]
    MissingCaHash { file: String, cert: PathBuf },
    #[error("config file {file}: {error}")]
    TokenFile { file: String, error: TokenFileError },
    #[error("config file {file}: {error}")]
    Isolation { file: String, error: crate::ConfigError },
}

/// The node certificate whose presence means the node has enrolled (`state::StateDir` keeps it).
const NODE_CERT: &str = "node.crt";

impl AgentConfig {
    /// The `HOST:PORT`s `coordinator` lists, in order.
    pub fn coordinator_addresses(&self) -> Vec<&str> {
        self.coordinator.split(',').map(str::trim).filter(|a| !a.is_empty()).collect()
    }

    /// Checks what loading alone cannot: the coordinator address, the CA pin, and, on a node that
    /// has not enrolled yet, that a bootstrap token and the pin are there to enroll with (a token
    /// file must be readable and not empty). `file` names the configuration file in the errors.
    /// Looks at the state directory without creating it.
    pub fn check(&self, file: &str) -> Result<(), CheckError> {
        let file = file.to_string();
        let host_port = |address: &str| {
            let (host, port) = address.rsplit_once(':').unwrap_or_default();
            !host.is_empty() && port.parse::<u16>().is_ok()
        };
        let addresses = self.coordinator_addresses();
        if addresses.is_empty() || !addresses.iter().all(|a| host_port(a)) {
            return Err(CheckError::Coordinator { file, value: self.coordinator.clone() });
        }
        if !self.ca_hash.is_empty() && self.ca_hash.parse::<hexa_shared::pki::CaHash>().is_err() {
            return Err(CheckError::CaHash { file, value: self.ca_hash.clone() });
        }
        if let Err(error) = self.isolation.baseline_pod_cidr() {
            return Err(CheckError::Isolation { file, error });
        }
        let cert = self.state_dir.join(NODE_CERT);
        if cert.exists() {
            // Enrolled: the token is not used again, whatever it says.
            return Ok(());
        }
        let token = self.bootstrap_token().map_err(|error| CheckError::TokenFile { file: file.clone(), error })?;
        if token.is_empty() {
            return Err(CheckError::MissingToken { file, cert });
        }
        if self.ca_hash.is_empty() {
            return Err(CheckError::MissingCaHash { file, cert });
        }
        Ok(())
    }

    /// The bootstrap token: `token`, or else the contents of `token_file`, or empty when neither
    /// is set.
    pub fn bootstrap_token(&self) -> Result<String, TokenFileError> {
        if !self.token.is_empty() || self.token_file.as_os_str().is_empty() {
            return Ok(self.token.clone());
        }
        let path = &self.token_file;
        let text = std::fs::read_to_string(path)
            .map_err(|source| TokenFileError::Unreadable { path: path.clone(), source })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(TokenFileError::Empty { path: path.clone() });
        }
        Ok(token.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_file_documents_every_key_with_its_default() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/agent.toml");
        let loaded: AgentConfig = hexa_shared::config::load(Some(&path), "/x".as_ref(), []).unwrap();
        assert_eq!(loaded, AgentConfig::default());
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let documented = |key: &str| {
            lines
                .iter()
                .position(|l| l.starts_with(&format!("{key} =")))
                .is_some_and(|i| lines[..i].iter().rev().take_while(|l| !l.is_empty()).any(|l| l.starts_with('#')))
        };
        fn check(table: &toml::Table, prefix: &str, text: &str, documented: &dyn Fn(&str) -> bool) {
            for (key, value) in table {
                let name = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                match value {
                    toml::Value::Table(section) => {
                        assert!(text.contains(&format!("[{name}]")), "[{name}] missing");
                        check(section, &name, text, documented);
                    }
                    _ => assert!(documented(key), "{name}"),
                }
            }
        }
        check(&toml::Table::try_from(AgentConfig::default()).unwrap(), "", &text, &documented);
    }

    #[test]
    fn the_token_comes_from_its_file_when_not_given_inline() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "abcdef.0123456789abcdef\n").unwrap();
        let config = AgentConfig { token_file: file.clone(), ..AgentConfig::default() };
        assert_eq!(config.bootstrap_token().unwrap(), "abcdef.0123456789abcdef");
        let inline = AgentConfig { token: "t".into(), ..config.clone() };
        assert_eq!(inline.bootstrap_token().unwrap(), "t");
        std::fs::write(&file, "  \n").unwrap();
        assert!(config.bootstrap_token().unwrap_err().to_string().contains("is empty"));
        let missing = AgentConfig { token_file: dir.path().join("nope"), ..AgentConfig::default() };
        let err = missing.bootstrap_token().unwrap_err().to_string();
        assert!(err.contains("nope") && err.contains("token_file"), "{err}");
        assert_eq!(AgentConfig::default().bootstrap_token().unwrap(), "");
    }

    #[test]
    fn several_coordinator_addresses_are_taken_each_one_checked() {
        let state = tempfile::tempdir().unwrap();
        let enrolled_nowhere = |coordinator: &str| AgentConfig {
            coordinator: coordinator.into(),
            token: "abcdef.0123456789abcdef".into(),
            ca_hash: format!("sha256:{}", "0".repeat(64)),
            state_dir: state.path().join("agent"),
            ..AgentConfig::default()
        };
        let several = enrolled_nowhere("c1.example:7443, 10.0.0.2:7443,c3:7443");
        assert_eq!(several.coordinator_addresses(), ["c1.example:7443", "10.0.0.2:7443", "c3:7443"]);
        assert!(several.check("agent.toml").is_ok());
        for bad in ["c1:7443,c2", "", " , ", "c1:7443,:7443"] {
            let err = enrolled_nowhere(bad).check("agent.toml").unwrap_err().to_string();
            assert!(err.contains("is not HOST:PORT") && err.contains("separated by commas"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn environment_overrides_reach_nested_keys() {
        let env = [("HEXA_RESERVED_CPU_MILLIS".to_string(), "750".to_string()), ("HEXA_TOKEN".into(), "t".into())];
        let loaded: AgentConfig = hexa_shared::config::load(None, "/nonexistent".as_ref(), env).unwrap();
        assert_eq!((loaded.reserved.cpu_millis, loaded.token.as_str()), (750, "t"));
    }
}

//! `[proxmox]`: where dedicated nodes come from. Without this section the coordinator provisions
//! nothing and dedicated tenants wait for nodes enrolled by hand.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProxmoxSettings {
    /// API base, `https://HOST:8006` (the `/api2/json` path is added).
    pub endpoint: String,
    /// File holding the API token, `USER@REALM!TOKENID=SECRET`.
    pub token_file: PathBuf,
    /// PEM file of the CA that signed the API's certificate. Either this or `fingerprint`.
    pub ca_file: PathBuf,
    /// sha256 fingerprint of the API's certificate (`AA:BB:...` as the PVE GUI shows it), for the
    /// self-signed certificate PVE installs by default.
    pub fingerprint: String,
    /// The template to clone for each node class.
    pub templates: BTreeMap<String, Template>,
    /// PVE nodes new VMs may go to; empty: every online node. The one with most free memory wins.
    pub target_nodes: Vec<String>,
    /// Storage for full clones; empty: the template's.
    pub storage: String,
    /// Full clones (independent of the template) or linked clones.
    pub full_clone: bool,
    /// Bridge of the VM's first NIC (`net0`); empty: as the template has it.
    pub bridge: String,
    /// Extra tags on every VM, besides `hexabase`, `hx-tenant-<tenant>` and `hx-rec-<record>`.
    pub tags: Vec<String>,
    /// Address the seed server listens on (plain HTTP: the VMs' cloud-init reads it).
    pub seed_listen: SocketAddr,
    /// Base URL VMs reach the seed server at, e.g. `http://10.0.0.5:7081`; empty:
    /// `http://<seed_listen>`.
    pub seed_url: String,
    /// Coordinator QUIC address as VMs reach it, `HOST:PORT`.
    pub coordinator_address: String,
    /// How a VM gets the agent when its template lacks it: an apt source line
    /// (`deb [signed-by=/etc/apt/keyrings/hexabase.asc] URL SUITE main`) ...
    pub apt_source: String,
    /// ... with this armored key written to `/etc/apt/keyrings/hexabase.asc`, ...
    pub apt_key: String,
    /// ... or a `.deb` this coordinator serves itself on the seed listener (air-gapped sites).
    pub agent_deb: PathBuf,
    /// How long a PVE task may run before it counts as failed.
    #[serde(with = "humantime_serde")]
    pub task_timeout: Duration,
    /// A VM whose agent has not enrolled this long after its start is destroyed and replaced.
    #[serde(with = "humantime_serde")]
    pub registration_timeout: Duration,
    /// How long a clean shutdown may take before the VM is stopped hard.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Per request to the API.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Steps (PVE tasks) in flight at once across all VMs; 0: no limit (still one per VM).
    pub max_in_flight: usize,
    /// How often a running task's status is asked at first; it slows to four times that.
    #[serde(with = "humantime_serde")]
    pub task_poll: Duration,
    /// How long retries of one call (locks, 5xx, timeouts) go on before the step fails.
    #[serde(with = "humantime_serde")]
    pub retry_for: Duration,
}

/// A VM template of a node class.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// PVE node holding the template.
    pub node: String,
    pub vmid: u32,
    /// The disk resized to the class's ephemeral size, e.g. `scsi0`.
    #[serde(default = "default_disk")]
    pub disk: String,
}

fn default_disk() -> String {
    "scsi0".to_string()
}

impl Default for ProxmoxSettings {
    fn default() -> Self {
        ProxmoxSettings {
            endpoint: String::new(),
            token_file: PathBuf::from("/etc/hexabase/proxmox.token"),
            ca_file: PathBuf::new(),
            fingerprint: String::new(),
            templates: BTreeMap::new(),
            target_nodes: Vec::new(),
            storage: String::new(),
            full_clone: true,
            bridge: String::new(),
            tags: Vec::new(),
            seed_listen: SocketAddr::from(([0, 0, 0, 0], 7081)),
            seed_url: String::new(),
            coordinator_address: String::new(),
            apt_source: String::new(),
            apt_key: String::new(),
            agent_deb: PathBuf::new(),
            task_timeout: Duration::from_secs(600),
            registration_timeout: Duration::from_secs(900),
            shutdown_timeout: Duration::from_secs(120),
            request_timeout: Duration::from_secs(30),
            max_in_flight: 0,
            task_poll: Duration::from_millis(500),
            retry_for: Duration::from_secs(300),
        }
    }
}

impl ProxmoxSettings {
    pub fn validate(&self, classes: &[hexa_shared::tenant::NodeClass]) -> Result<(), ConfigError> {
        let bad = |key: &'static str, message: String| ConfigError::Invalid { key, message };
        if !self.endpoint.starts_with("https://") && !self.endpoint.starts_with("http://") {
            return Err(bad("proxmox.endpoint", format!("{:?} is not an https:// URL", self.endpoint)));
        }
        if self.endpoint.starts_with("https://") && self.ca_file.as_os_str().is_empty() && self.fingerprint.is_empty() {
            return Err(bad(
                "proxmox.fingerprint",
                "set proxmox.ca_file or proxmox.fingerprint (`pvenode cert info` shows it): PVE's certificate is \
                 self-signed by default"
                    .into(),
            ));
        }
        if !self.fingerprint.is_empty() {
            super::tls::parse_fingerprint(&self.fingerprint).map_err(|m| bad("proxmox.fingerprint", m))?;
        }
        if self.coordinator_address.is_empty() {
            return Err(bad(
                "proxmox.coordinator_address",
                "set the HOST:PORT VMs reach the coordinator's QUIC at".into(),
            ));
        }
        for class in classes {
            if !self.templates.contains_key(&class.name) {
                return Err(bad(
                    "proxmox.templates",
                    format!("no template for node class {}: add [proxmox.templates.{}]", class.name, class.name),
                ));
            }
        }
        for (key, value) in [
            ("proxmox.task_timeout", self.task_timeout),
            ("proxmox.registration_timeout", self.registration_timeout),
            ("proxmox.request_timeout", self.request_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::Zero { key });
            }
        }
        Ok(())
    }

    /// The seed server's base URL as VMs use it.
    pub fn seed_base(&self, bound: SocketAddr) -> String {
        if self.seed_url.is_empty() {
            format!("http://{bound}")
        } else {
            self.seed_url.trim_end_matches('/').to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The commented `[proxmox]` example in `packaging/coordinator.toml`, uncommented, documents
    /// every key with its default (but for the values an operator must give).
    #[test]
    fn the_packaged_example_documents_every_key() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/coordinator.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let start = text.find("# [proxmox]\n").expect("a commented [proxmox] section");
        let example: String = text[start..]
            .lines()
            .filter(|l| !l.starts_with("# #"))
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .map(|l| format!("{l}\n"))
            .collect();
        #[derive(Deserialize)]
        struct Doc {
            proxmox: ProxmoxSettings,
        }
        let doc: Doc = toml::from_str(&example).unwrap();
        let given = ProxmoxSettings {
            endpoint: doc.proxmox.endpoint.clone(),
            fingerprint: doc.proxmox.fingerprint.clone(),
            seed_url: doc.proxmox.seed_url.clone(),
            coordinator_address: doc.proxmox.coordinator_address.clone(),
            templates: doc.proxmox.templates.clone(),
            ..ProxmoxSettings::default()
        };
        assert_eq!(doc.proxmox, given);
        let keys = toml::Table::try_from(ProxmoxSettings::default()).unwrap();
        for key in keys.keys().filter(|k| *k != "templates") {
            assert!(example.lines().any(|l| l.starts_with(&format!("{key} ="))), "{key} undocumented");
        }
        assert!(example.contains("[proxmox.templates.S]"));
    }

    #[test]
    fn validation_names_the_key_to_fix() {
        let classes = hexa_shared::tenant::NodeClass::defaults();
        let mut s = ProxmoxSettings { endpoint: "https://pve:8006".into(), ..ProxmoxSettings::default() };
        assert!(s.validate(&classes).unwrap_err().to_string().contains("proxmox.fingerprint"));
        s.fingerprint = "zz".into();
        assert!(s.validate(&classes).unwrap_err().to_string().contains("not a hex sha256"));
        s.fingerprint = "ab".repeat(32);
        assert!(s.validate(&classes).unwrap_err().to_string().contains("proxmox.coordinator_address"));
        s.coordinator_address = "10.0.0.5:7443".into();
        let err = s.validate(&classes).unwrap_err().to_string();
        assert!(err.contains("[proxmox.templates.S]"), "{err}");
        for class in ["S", "M", "L"] {
            s.templates.insert(class.into(), Template { node: "pve1".into(), vmid: 9000, disk: "scsi0".into() });
        }
        s.validate(&classes).unwrap();
    }
}

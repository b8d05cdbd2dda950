//! What a VM's cloud-init reads, rendered as pure functions from the VM's facts to text.
//!
//! Measured with Debian 12's cloud-init 22.4: without `dsmode=net` a network seed is fetched and
//! then ignored, so it is in the SMBIOS serial and in `meta-data` both; a missing `vendor-data`
//! is retried ten times before the seed is dropped, so an empty `#cloud-config` is served.

use base64::Engine;
use serde::Serialize;

/// The VM's `smbios1`: our uuid, and the NoCloud seed URL in the serial (base64, as PVE wants
/// every free-text field when `base64=1`).
pub fn smbios1(uuid: &str, seed_url: &str) -> String {
    let serial = format!("ds=nocloud;s={seed_url};dsmode=net");
    let encoded = base64::engine::general_purpose::STANDARD.encode(serial);
    format!("uuid={uuid},serial={encoded},base64=1")
}

/// `meta-data`: the instance is the VM's SMBIOS uuid (a re-imaged VM is a new instance).
pub fn meta_data(instance_id: &str, hostname: &str) -> String {
    format!("instance-id: {instance_id}\nlocal-hostname: {hostname}\ndsmode: net\n")
}

/// `vendor-data`: present and empty.
pub const VENDOR_DATA: &str = "#cloud-config\n{}\n";

/// How the VM gets the agent when its template lacks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Install {
    /// The template has it.
    Preinstalled,
    /// From an apt repository: a source line, and its armored key when not in the template.
    Apt { source: String, key: Option<String> },
    /// The `.deb` at this URL (served by the coordinator).
    Deb { url: String },
}

/// Everything the user-data says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSeed {
    pub coordinator: String,
    pub ca_hash: String,
    pub token: String,
    pub node_name: String,
    pub node_class: String,
    pub vmid: u32,
    pub install: Install,
}

#[derive(Serialize)]
struct CloudConfig {
    hostname: String,
    write_files: Vec<WriteFile>,
    runcmd: Vec<Vec<String>>,
}

#[derive(Serialize)]
struct WriteFile {
    path: String,
    owner: String,
    permissions: String,
    content: String,
}

fn toml_string(s: &str) -> String {
    // A basic TOML string: backslash and quote escaped; our values hold no control characters.
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `/etc/hexabase/agent.toml` for the VM.
pub fn agent_toml(seed: &AgentSeed) -> String {
    format!(
        "# Written by cloud-init from the coordinator's seed for Proxmox VM {vmid}, node class {class}.\n\
         coordinator = {coordinator}\n\
         ca_hash = {ca_hash}\n\
         # One-time token bound to this VM (its VMID and SMBIOS uuid).\n\
         token = {token}\n\
         node_name = {node_name}\n\
         proxmox_vmid = {vmid}\n",
        vmid = seed.vmid,
        class = seed.node_class,
        coordinator = toml_string(&seed.coordinator),
        ca_hash = toml_string(&seed.ca_hash),
        token = toml_string(&seed.token),
        node_name = toml_string(&seed.node_name),
    )
}

/// `write_files` runs before `runcmd`, so the package finds `/etc/hexabase/agent.toml` already
/// there and differing from its own conffile; dpkg would then ask what to do, and with no terminal
/// the install fails (`end of file on stdin at conffile prompt`). The seed's file is kept.
const KEEP_SEED_CONFIG: &str = "-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold";

/// `user-data`: write the agent's config, install the agent when missing, enable it.
pub fn user_data(seed: &AgentSeed) -> String {
    let mut write_files = vec![WriteFile {
        path: "/etc/hexabase/agent.toml".into(),
        owner: "root:root".into(),
        permissions: "0600".into(),
        content: agent_toml(seed),
    }];
    let sh = |script: String| vec!["sh".to_string(), "-c".to_string(), script];
    let mut runcmd = Vec::new();
    match &seed.install {
        Install::Preinstalled => {}
        Install::Apt { source, key } => {
            if let Some(key) = key {
                write_files.push(WriteFile {
                    path: "/etc/apt/keyrings/hexabase.asc".into(),
                    owner: "root:root".into(),
                    permissions: "0644".into(),
                    content: key.clone(),
                });
            }
            write_files.push(WriteFile {
                path: "/etc/apt/sources.list.d/hexabase.list".into(),
                owner: "root:root".into(),
                permissions: "0644".into(),
                content: format!("{source}\n"),
            });
            runcmd.push(sh(format!(
                "command -v hexa-agent >/dev/null || {{ apt-get update && DEBIAN_FRONTEND=noninteractive apt-get \
                 install -y {KEEP_SEED_CONFIG} hexa-agent; }}"
            )));
        }
        Install::Deb { url } => runcmd.push(sh(format!(
            "command -v hexa-agent >/dev/null || {{ curl -fsSL -o /tmp/hexa-agent.deb '{url}' && \
             DEBIAN_FRONTEND=noninteractive apt-get install -y {KEEP_SEED_CONFIG} /tmp/hexa-agent.deb; }}"
        ))),
    }
    runcmd.push(vec!["systemctl".into(), "enable".into(), "--now".into(), "hexa-agent.service".into()]);
    let config = CloudConfig { hostname: seed.node_name.clone(), write_files, runcmd };
    // Serialising plain strings and lists cannot fail.
    let yaml = serde_norway::to_string(&config).unwrap_or_default();
    format!("#cloud-config\n{yaml}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(install: Install) -> AgentSeed {
        AgentSeed {
            coordinator: "10.0.0.5:7443".into(),
            ca_hash: format!("sha256:{}", "ab".repeat(32)),
            token: "abcdef.0123456789abcdef".into(),
            node_name: "hx-k3v9q2m1xz".into(),
            node_class: "M".into(),
            vmid: 105,
            install,
        }
    }

    #[test]
    fn user_data_with_an_apt_repository() {
        let install = Install::Apt {
            source: "deb [signed-by=/etc/apt/keyrings/hexabase.asc] https://apt.example/ bookworm main".into(),
            key: Some("-----BEGIN PGP PUBLIC KEY BLOCK-----\nxyz\n-----END PGP PUBLIC KEY BLOCK-----\n".into()),
        };
        insta::assert_snapshot!("user_data_apt", user_data(&seed(install)));
    }

    #[test]
    fn user_data_with_a_served_deb() {
        let install = Install::Deb { url: "http://10.0.0.5:7081/packages/hexa-agent.deb".into() };
        insta::assert_snapshot!("user_data_deb", user_data(&seed(install)));
    }

    #[test]
    fn the_serial_carries_the_seed_with_dsmode_net() {
        let value = smbios1("0d6f2b4a-1c2e-4f5a-9b8c-7d6e5f4a3b2c", "http://10.0.0.5:7081/seed/abc/");
        let serial = value.split(',').find_map(|p| p.strip_prefix("serial=")).unwrap();
        let decoded = base64::engine::general_purpose::STANDARD.decode(serial).unwrap();
        assert_eq!(String::from_utf8(decoded).unwrap(), "ds=nocloud;s=http://10.0.0.5:7081/seed/abc/;dsmode=net");
        assert!(value.starts_with("uuid=0d6f2b4a-1c2e-4f5a-9b8c-7d6e5f4a3b2c,") && value.ends_with(",base64=1"));
        assert!(meta_data("u", "h").contains("dsmode: net\n"));
    }

    /// The real `cloud-init schema` accepts every user-data we render.
    #[test]
    fn rendered_user_data_passes_cloud_init_schema() {
        let Ok(found) = std::process::Command::new("cloud-init").arg("--version").output() else {
            eprintln!(
                "rendered_user_data_passes_cloud_init_schema: skipped: `cloud-init` is not installed (Debian package cloud-init)"
            );
            return;
        };
        assert!(found.status.success());
        let dir = tempfile::tempdir().unwrap();
        let installs = [
            Install::Preinstalled,
            Install::Apt { source: "deb https://apt.example/ bookworm main".into(), key: Some("KEY\n".into()) },
            Install::Deb { url: "http://10.0.0.5:7081/packages/hexa-agent.deb".into() },
        ];
        for (i, install) in installs.into_iter().enumerate() {
            let path = dir.path().join(format!("user-data-{i}"));
            std::fs::write(&path, user_data(&seed(install))).unwrap();
            let out =
                std::process::Command::new("cloud-init").args(["schema", "--config-file"]).arg(&path).output().unwrap();
            assert!(
                out.status.success(),
                "cloud-init schema refused user-data {i}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // The check itself refuses what is wrong.
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "#cloud-config\nwrite_files: 3\n").unwrap();
        let out =
            std::process::Command::new("cloud-init").args(["schema", "--config-file"]).arg(&bad).output().unwrap();
        assert!(!out.status.success(), "cloud-init schema accepted a wrong write_files");
    }
}

//! What an emulated VM does when it starts, as cloud-init's NoCloud datasource (22.4) does it:
//! the seed URL from the SMBIOS serial (`ds=nocloud;s=<url>;dsmode=net`, base64 when `smbios1`
//! says `base64=1`); `meta-data`, `vendor-data` and `user-data` fetched (a missing vendor-data
//! retried ten times, then the seed dropped); a seed without `dsmode: net` ignored; `write_files`
//! applied under the VM's root; and `systemctl enable --now hexa-agent.service` starting a real
//! agent with the config written there and the VM's SMBIOS uuid in a sysfs fixture root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::BootHook;

/// A VM starting.
#[derive(Debug, Clone)]
pub struct BootRequest {
    pub vmid: u32,
    pub name: String,
    pub smbios1: String,
    /// The VM's whole configuration (`cores`, `memory`, ...) and its disk's size.
    pub config: BTreeMap<String, String>,
    pub disk_gib: u64,
}

/// A booted VM's agent.
#[derive(Debug)]
pub struct Booted {
    pub node_name: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), hexa_agent::AgentError>>,
}

impl Booted {
    /// A VM whose guest runs in `task`, told to power off through `stop`.
    pub fn new(
        node_name: String,
        stop: watch::Sender<bool>,
        task: JoinHandle<Result<(), hexa_agent::AgentError>>,
    ) -> Booted {
        Booted { node_name, stop, task }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(Duration::from_secs(5), self.task).await.is_err() {
            tracing::warn!(node = %self.node_name, "emulated VM's agent did not stop in time");
        }
    }
}

/// What the boots saw, for assertions: per VMID, the seed files fetched and the outcome.
#[derive(Debug, Default, Clone)]
pub struct BootLog {
    entries: Arc<Mutex<BTreeMap<u32, Vec<String>>>>,
}

impl BootLog {
    fn push(&self, vmid: u32, line: String) {
        tracing::info!(vmid, "{line}");
        self.entries.lock().unwrap().entry(vmid).or_default().push(line);
    }

    pub fn of(&self, vmid: u32) -> Vec<String> {
        self.entries.lock().unwrap().get(&vmid).cloned().unwrap_or_default()
    }
}

/// The parts of `smbios1`, with base64 fields decoded.
pub fn parse_smbios1(value: &str) -> BTreeMap<String, String> {
    let mut fields: BTreeMap<String, String> =
        value.split(',').filter_map(|p| p.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
    if fields.get("base64").map(String::as_str) == Some("1") {
        for key in ["serial", "manufacturer", "product", "family", "sku", "version"] {
            if let Some(v) = fields.get(key) {
                let decoded = base64::engine::general_purpose::STANDARD.decode(v).unwrap_or_default();
                fields.insert(key.to_string(), String::from_utf8_lossy(&decoded).into_owned());
            }
        }
    }
    fields
}

/// `ds=nocloud;s=<url>;dsmode=net` into its keys.
pub fn parse_serial(serial: &str) -> BTreeMap<String, String> {
    serial.split(';').filter_map(|p| p.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Files the user-data writes.
#[derive(Debug, PartialEq)]
pub struct WriteFile {
    pub path: String,
    pub content: String,
    pub mode: u32,
}

/// The `.deb` URL a `runcmd` entry downloads the agent from (`curl ... -o /tmp/hexa-agent.deb 'URL'`).
pub fn deb_url(text: &str) -> Option<String> {
    let doc: serde_json::Value = serde_norway::from_str(text).ok()?;
    doc["runcmd"].as_array()?.iter().find_map(|c| {
        let script = c.as_array()?.last()?.as_str()?;
        let rest = script.split("-o /tmp/hexa-agent.deb '").nth(1)?;
        rest.split('\'').next().map(String::from)
    })
}

/// The `#cloud-config` user-data's `write_files`, and whether `runcmd` enables the agent.
pub fn parse_user_data(text: &str) -> Result<(Vec<WriteFile>, bool), String> {
    if !text.starts_with("#cloud-config") {
        return Err("user-data is not #cloud-config".into());
    }
    let doc: serde_json::Value = serde_norway::from_str(text).map_err(|e| format!("user-data YAML: {e}"))?;
    let mut files = Vec::new();
    for f in doc["write_files"].as_array().into_iter().flatten() {
        let path = f["path"].as_str().ok_or("write_files entry without path")?.to_string();
        let content = f["content"].as_str().unwrap_or("").to_string();
        let mode = f["permissions"]
            .as_str()
            .and_then(|p| u32::from_str_radix(p.trim_start_matches("0o"), 8).ok())
            .unwrap_or(0o644);
        files.push(WriteFile { path, content, mode });
    }
    let enables = doc["runcmd"].as_array().into_iter().flatten().any(|c| {
        let words: Vec<&str> = c.as_array().into_iter().flatten().filter_map(|w| w.as_str()).collect();
        words.first() == Some(&"systemctl") && words.contains(&"enable") && words.contains(&"hexa-agent.service")
    });
    Ok((files, enables))
}

fn under(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// Told the name of each node whose agent a boot started.
pub type OnAgent = Arc<dyn Fn(&str) + Send + Sync>;

/// A boot hook running cloud-init's steps and then the agent; VM roots go under `dir`.
/// `on_agent` is told each node name that comes up (to register it, as the kubelet would).
pub fn cloud_init(dir: PathBuf, log: BootLog, on_agent: Option<OnAgent>) -> BootHook {
    Arc::new(move |request: BootRequest| {
        let dir = dir.clone();
        let log = log.clone();
        let on_agent = on_agent.clone();
        Box::pin(async move {
            match boot(&dir, &request, &log).await {
                Ok(booted) => {
                    if let Some(hook) = &on_agent {
                        hook(&booted.node_name);
                    }
                    Some(booted)
                }
                Err(e) => {
                    log.push(request.vmid, format!("boot: {e}"));
                    None
                }
            }
        })
    })
}

async fn boot(dir: &Path, request: &BootRequest, log: &BootLog) -> Result<Booted, String> {
    let vmid = request.vmid;
    let fields = parse_smbios1(&request.smbios1);
    let uuid = fields.get("uuid").cloned().ok_or("no SMBIOS uuid")?;
    let serial = parse_serial(fields.get("serial").map(String::as_str).unwrap_or(""));
    if serial.get("ds").map(String::as_str) != Some("nocloud") {
        return Err("no NoCloud datasource in the SMBIOS serial".into());
    }
    let seed = serial.get("s").cloned().ok_or("no seed URL")?;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().map_err(|e| e.to_string())?;
    let fetch = |file: &'static str| {
        let url = format!("{}{file}", if seed.ends_with('/') { seed.clone() } else { format!("{seed}/") });
        let http = http.clone();
        async move {
            let response = http.get(&url).send().await.map_err(|e| format!("{url}: {e}"))?;
            let status = response.status();
            let text = response.text().await.map_err(|e| format!("{url}: {e}"))?;
            if status.is_success() { Ok(text) } else { Err(format!("{url}: {status}")) }
        }
    };
    let meta = fetch("meta-data").await?;
    log.push(vmid, "fetched meta-data".into());
    // cloud-init 22.4 ignores a network seed unless dsmode is net.
    if serial.get("dsmode").map(String::as_str) != Some("net") {
        return Err("seed fetched and ignored: dsmode=net missing from the SMBIOS serial".into());
    }
    let meta: serde_json::Value = serde_norway::from_str(&meta).map_err(|e| format!("meta-data: {e}"))?;
    if meta["dsmode"].as_str() != Some("net") {
        return Err("seed fetched and ignored: meta-data lacks dsmode: net".into());
    }
    if meta["instance-id"].as_str() != Some(uuid.as_str()) {
        return Err(format!("meta-data instance-id {:?} is not the SMBIOS uuid {uuid}", meta["instance-id"]));
    }
    let mut vendor = None;
    for _ in 0..10 {
        match fetch("vendor-data").await {
            Ok(text) => {
                vendor = Some(text);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    if vendor.is_none() {
        return Err("vendor-data missing after 10 tries: seed dropped".into());
    }
    log.push(vmid, "fetched vendor-data".into());
    let user = fetch("user-data").await?;
    log.push(vmid, "fetched user-data".into());
    let (files, enables) = parse_user_data(&user)?;
    let root = super::vm_root(dir, vmid);
    // A VMID reused by a new clone is a new disk: nothing of the VM that had it before is left.
    let instance = root.join("var/lib/cloud/instance-id");
    if std::fs::read_to_string(&instance).ok().as_deref() != Some(uuid.as_str()) {
        let _ = std::fs::remove_dir_all(&root);
    }
    std::fs::create_dir_all(instance.parent().unwrap_or(&root)).map_err(|e| e.to_string())?;
    std::fs::write(&instance, &uuid).map_err(|e| e.to_string())?;
    for f in &files {
        let path = under(&root, &f.path);
        std::fs::create_dir_all(path.parent().unwrap_or(&root)).map_err(|e| e.to_string())?;
        std::fs::write(&path, &f.content).map_err(|e| e.to_string())?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(f.mode)).map_err(|e| e.to_string())?;
        log.push(vmid, format!("wrote {} ({:o})", f.path, f.mode));
    }
    // The template has the agent; a user-data that downloads the package gets it fetched for real.
    if let Some(url) = deb_url(&user) {
        let response = http.get(&url).send().await.map_err(|e| format!("{url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("{url}: {}", response.status()));
        }
        let bytes = response.bytes().await.map_err(|e| format!("{url}: {e}"))?;
        let deb = under(&root, "/tmp/hexa-agent.deb");
        std::fs::create_dir_all(deb.parent().unwrap_or(&root)).map_err(|e| e.to_string())?;
        std::fs::write(&deb, &bytes).map_err(|e| e.to_string())?;
        log.push(vmid, format!("downloaded {} bytes of hexa-agent.deb from {url}", bytes.len()));
    }
    if !enables {
        return Err("user-data does not enable hexa-agent.service".into());
    }
    // The VM's SMBIOS identity, where the kernel shows it.
    let sys = root.join("sys");
    let dmi = sys.join("class/dmi/id");
    std::fs::create_dir_all(&dmi).map_err(|e| e.to_string())?;
    std::fs::write(dmi.join("product_uuid"), format!("{}\n", uuid.to_ascii_uppercase())).map_err(|e| e.to_string())?;
    let config_path = under(&root, "/etc/hexabase/agent.toml");
    let mut config: hexa_agent::config::AgentConfig =
        hexa_shared::config::load(Some(&config_path), Path::new("/nonexistent"), std::iter::empty())
            .map_err(|e| format!("agent.toml: {e}"))?;
    config.state_dir = under(&root, &config.state_dir.display().to_string());
    config.ephemeral_path = root.clone();
    let node_name = if config.node_name.is_empty() { request.name.clone() } else { config.node_name.clone() };
    let host = hexa_agent::Host { sys_root: sys, ..crate::inproc::test_host(&config) };
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(hexa_agent::run(config, host, stopped));
    log.push(vmid, format!("started hexa-agent as {node_name}"));
    Ok(Booted { node_name, stop, task })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_url_comes_from_the_base64_serial() {
        let serial = base64::engine::general_purpose::STANDARD.encode("ds=nocloud;s=http://h:1/seed/x/;dsmode=net");
        let fields = parse_smbios1(&format!("uuid=0d6f2b4a-1c2e-4f5a-9b8c-7d6e5f4a3b2c,serial={serial},base64=1"));
        let ds = parse_serial(&fields["serial"]);
        assert_eq!(
            (ds["ds"].as_str(), ds["s"].as_str(), ds["dsmode"].as_str()),
            ("nocloud", "http://h:1/seed/x/", "net")
        );
        let (files, enables) = parse_user_data(
            "#cloud-config\nwrite_files:\n- path: /etc/x\n  permissions: '0600'\n  content: |\n    a = 1\nruncmd:\n- [systemctl, enable, --now, hexa-agent.service]\n",
        )
        .unwrap();
        assert_eq!(files, vec![WriteFile { path: "/etc/x".into(), content: "a = 1\n".into(), mode: 0o600 }]);
        assert!(enables);
        assert!(parse_user_data("write_files: []").is_err());
    }
}

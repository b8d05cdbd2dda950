//! The Proxmox VE API as the provisioner uses it.
//!
//! Every answer is `{"data": ...}`; integers may come as strings and booleans as 0/1, so the
//! types here read both. An error's text is the JSON `message` when there is one, else the reason
//! phrase of the status line (where PVE puts it), plus any per-parameter `errors`. Calls that
//! fail on a lock (`VM 105 is locked (clone)`, `can't lock file ... got timeout`), a 5xx that is
//! not a definite answer, or a timeout are retried with backoff for `retry_for`; tasks are
//! followed by UPID on the node the UPID names.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use super::settings::ProxmoxSettings;
use super::tls;

#[derive(Debug, thiserror::Error)]
pub enum ProxmoxError {
    #[error("proxmox configuration: {0}")]
    Config(String),
    #[error("Proxmox API {method} {path}: {status} {message}")]
    Api { method: String, path: String, status: u16, message: String },
    #[error("Proxmox API {method} {path}: {message}")]
    Transport { method: String, path: String, message: String, timeout: bool },
    #[error("Proxmox API {method} {path}: unreadable answer: {message}")]
    Decode { method: String, path: String, message: String },
    #[error("Proxmox task {upid} failed: {exitstatus}")]
    Task { upid: String, exitstatus: String },
    #[error("Proxmox task {upid} still running after {}", humantime::format_duration(*waited))]
    TaskTimeout { upid: String, waited: Duration },
    #[error("{0:?} is not a Proxmox task id (UPID)")]
    BadUpid(String),
}

impl ProxmoxError {
    /// The text PVE gave, for matching.
    pub fn text(&self) -> &str {
        match self {
            ProxmoxError::Api { message, .. } | ProxmoxError::Transport { message, .. } => message,
            ProxmoxError::Task { exitstatus, .. } => exitstatus,
            ProxmoxError::Decode { message, .. } | ProxmoxError::Config(message) => message,
            ProxmoxError::TaskTimeout { .. } | ProxmoxError::BadUpid(_) => "",
        }
    }

    /// A lock held by another task: `VM 105 is locked (clone)`, `can't lock file ... got timeout`.
    pub fn is_lock(&self) -> bool {
        let text = self.text();
        text.contains("is locked") || text.contains("can't lock file") || text.contains("got timeout")
    }

    /// The VMID is taken (`/cluster/nextid` reserves nothing).
    pub fn is_vmid_taken(&self) -> bool {
        let text = self.text();
        text.contains("already exists") || text.contains("VM is already in use")
    }

    /// The VM is not there (any more).
    pub fn is_missing(&self) -> bool {
        let text = self.text();
        text.contains("does not exist") || text.contains("not exist")
    }

    /// Worth trying again: locks, timeouts, lost connections, and 5xx that are not a definite no.
    pub fn is_transient(&self) -> bool {
        match self {
            // A certificate that is not the one trusted stays so: say it at once.
            ProxmoxError::Transport { message, .. } => {
                !(message.contains("certificate") || message.contains("fingerprint"))
            }
            ProxmoxError::Api { status, .. } if *status >= 500 => {
                self.is_lock() || !(self.is_vmid_taken() || self.is_missing())
            }
            ProxmoxError::Api { .. } => self.is_lock(),
            ProxmoxError::Task { .. } => self.is_lock(),
            _ => false,
        }
    }
}

/// An integer PVE may send as a number or a string.
pub fn lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        N(u64),
        F(f64),
        S(String),
    }
    match Int::deserialize(d)? {
        Int::N(n) => Ok(n),
        Int::F(f) if f >= 0.0 => Ok(f as u64),
        Int::F(f) => Err(serde::de::Error::custom(format!("negative integer {f}"))),
        Int::S(s) => s.trim().parse().map_err(|_| serde::de::Error::custom(format!("{s:?} is not an integer"))),
    }
}

fn lenient_u64_opt<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(d)?;
    match value {
        None | Some(serde_json::Value::Null) => Ok(0),
        Some(v) => lenient_u64(v).map_err(serde::de::Error::custom),
    }
}

/// A boolean PVE may send as 0/1, "0"/"1" or true/false.
pub fn lenient_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(d)?;
    match value {
        None | Some(serde_json::Value::Null) => Ok(false),
        Some(serde_json::Value::Bool(b)) => Ok(b),
        Some(serde_json::Value::Number(n)) => Ok(n.as_f64().is_some_and(|n| n != 0.0)),
        Some(serde_json::Value::String(s)) => match s.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" | "" => Ok(false),
            _ => Err(serde::de::Error::custom(format!("{s:?} is not a boolean"))),
        },
        Some(other) => Err(serde::de::Error::custom(format!("{other} is not a boolean"))),
    }
}

/// A PVE node as `/cluster/resources?type=node` lists it.
#[derive(Deserialize, Debug, Clone, PartialEq)]
pub struct NodeResource {
    pub node: String,
    #[serde(default)]
    pub status: String,
    #[serde(default, deserialize_with = "lenient_u64_opt")]
    pub maxmem: u64,
    #[serde(default, deserialize_with = "lenient_u64_opt")]
    pub mem: u64,
}

/// A guest as `/cluster/resources?type=vm` lists it.
#[derive(Deserialize, Debug, Clone, PartialEq)]
pub struct VmResource {
    #[serde(deserialize_with = "lenient_u64")]
    pub vmid: u64,
    pub node: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub status: String,
    #[serde(default, deserialize_with = "lenient_bool")]
    pub template: bool,
    #[serde(default)]
    pub tags: String,
    #[serde(default)]
    pub lock: String,
}

impl VmResource {
    pub fn tag_list(&self) -> Vec<&str> {
        self.tags.split([';', ',', ' ']).filter(|t| !t.is_empty()).collect()
    }
}

/// `status/current` of a VM.
#[derive(Deserialize, Debug, Clone, PartialEq)]
pub struct VmStatus {
    pub status: String,
    #[serde(default)]
    pub lock: String,
}

#[derive(Deserialize, Debug)]
struct TaskStatus {
    status: String,
    #[serde(default)]
    exitstatus: Option<String>,
}

/// A task id: `UPID:<node>:<pid>:<pstart>:<starttime>:<type>:<id>:<user>:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upid {
    pub text: String,
    pub node: String,
}

impl Upid {
    pub fn parse(text: &str) -> Result<Upid, ProxmoxError> {
        let parts: Vec<&str> = text.split(':').collect();
        if parts.len() < 9 || parts[0] != "UPID" || parts[1].is_empty() {
            return Err(ProxmoxError::BadUpid(text.to_string()));
        }
        Ok(Upid { text: text.to_string(), node: parts[1].to_string() })
    }
}

/// How long retries wait: doubling from `first`, capped at `max`, with jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self.first.saturating_mul(1u32 << attempt.min(16)).min(self.max);
        let jitter = rand::random::<f64>() * 0.3 + 0.85;
        base.mul_f64(jitter)
    }
}

/// The API, with retries and a count of the HTTP calls made (for the benchmark).
#[derive(Debug, Clone)]
pub struct ProxmoxClient {
    http: reqwest::Client,
    base: String,
    auth: String,
    retry_for: Duration,
    pub backoff: Backoff,
    /// How often a task's status is asked.
    pub poll: Duration,
    task_timeout: Duration,
    calls: Arc<AtomicU64>,
}

/// Percent-encodes a form or query component.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

pub fn encode_params(params: &[(&str, String)]) -> String {
    params.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect::<Vec<_>>().join("&")
}

impl ProxmoxClient {
    pub fn new(settings: &ProxmoxSettings) -> Result<ProxmoxClient, ProxmoxError> {
        let token = std::fs::read_to_string(&settings.token_file).map_err(|e| {
            ProxmoxError::Config(format!(
                "cannot read the API token file {} (proxmox.token_file): {e}",
                settings.token_file.display()
            ))
        })?;
        let token = token.trim();
        if !token.contains('!') || !token.contains('=') {
            return Err(ProxmoxError::Config(format!(
                "{} does not hold an API token of the form USER@REALM!TOKENID=SECRET",
                settings.token_file.display()
            )));
        }
        let mut builder = reqwest::Client::builder().timeout(settings.request_timeout);
        if settings.endpoint.starts_with("https://") {
            let config = if !settings.fingerprint.is_empty() {
                tls::with_fingerprint(tls::parse_fingerprint(&settings.fingerprint).map_err(ProxmoxError::Config)?)
            } else {
                let pem = std::fs::read(&settings.ca_file).map_err(|e| {
                    ProxmoxError::Config(format!("cannot read proxmox.ca_file {}: {e}", settings.ca_file.display()))
                })?;
                tls::with_ca(&pem)
                    .map_err(|e| ProxmoxError::Config(format!("proxmox.ca_file {}: {e}", settings.ca_file.display())))?
            };
            builder = builder.tls_backend_preconfigured(config);
        }
        let http = builder.build().map_err(|e| ProxmoxError::Config(format!("HTTP client: {e}")))?;
        Ok(ProxmoxClient {
            http,
            base: format!("{}/api2/json", settings.endpoint.trim_end_matches('/')),
            auth: format!("PVEAPIToken={token}"),
            retry_for: settings.retry_for,
            backoff: Backoff { first: Duration::from_millis(250), max: Duration::from_secs(10) },
            poll: settings.task_poll,
            task_timeout: settings.task_timeout,
            calls: Arc::new(AtomicU64::new(0)),
        })
    }

    /// HTTP requests made so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// One request, no retries.
    pub async fn request_once<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        params: &[(&str, String)],
    ) -> Result<T, ProxmoxError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let encoded = encode_params(params);
        let in_query = method == Method::GET || method == Method::DELETE;
        let url = if in_query && !encoded.is_empty() {
            format!("{}{path}?{encoded}", self.base)
        } else {
            format!("{}{path}", self.base)
        };
        let mut request = self.http.request(method.clone(), url).header("Authorization", &self.auth);
        if !in_query {
            request = request.header("Content-Type", "application/x-www-form-urlencoded").body(encoded);
        }
        let transport = |e: reqwest::Error| {
            // reqwest's own text names the URL only; the causes say what went wrong (refused,
            // certificate, timeout).
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message = format!("{message}: {cause}");
                source = cause.source();
            }
            ProxmoxError::Transport {
                method: method.to_string(),
                path: path.to_string(),
                message,
                timeout: e.is_timeout(),
            }
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let reason = response
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
            .or_else(|| status.canonical_reason().map(String::from))
            .unwrap_or_default();
        let body = response.bytes().await.map_err(transport)?;
        let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
        if !status.is_success() {
            let mut message = json
                .as_ref()
                .and_then(|j| j.get("message"))
                .and_then(|m| m.as_str())
                .map(|m| m.trim().to_string())
                .filter(|m| !m.is_empty())
                .unwrap_or(reason);
            if let Some(errors) = json.as_ref().and_then(|j| j.get("errors")).and_then(|e| e.as_object()) {
                let details: Vec<String> =
                    errors.iter().map(|(k, v)| format!("{k}: {}", v.as_str().unwrap_or("").trim())).collect();
                message = format!("{message} ({})", details.join("; "));
            }
            return Err(ProxmoxError::Api {
                method: method.to_string(),
                path: path.to_string(),
                status: status.as_u16(),
                message,
            });
        }
        let decode =
            |message: String| ProxmoxError::Decode { method: method.to_string(), path: path.to_string(), message };
        let mut json = json.ok_or_else(|| decode("not JSON".into()))?;
        let data = json.get_mut("data").map(serde_json::Value::take).ok_or_else(|| decode("no \"data\"".into()))?;
        serde_json::from_value(data).map_err(|e| decode(e.to_string()))
    }

    /// A request retried with backoff while its failure is transient, for up to `retry_for` (at
    /// most 15 s).
    pub async fn request<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        params: &[(&str, String)],
    ) -> Result<T, ProxmoxError> {
        let started = Instant::now();
        let retry_for = self.call_retry_for();
        let mut attempt = 0;
        loop {
            match self.request_once(method.clone(), path, params).await {
                Err(e) if e.is_transient() && started.elapsed() < retry_for => {
                    let delay = self.backoff.delay(attempt);
                    tracing::warn!(error = %e, attempt, retry_in_ms = delay.as_millis() as u64, "Proxmox call failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(delay).await;
                }
                other => return other,
            }
        }
    }

    pub async fn nodes(&self) -> Result<Vec<NodeResource>, ProxmoxError> {
        self.request(Method::GET, "/cluster/resources", &[("type", "node".into())]).await
    }

    pub async fn vms(&self) -> Result<Vec<VmResource>, ProxmoxError> {
        self.request(Method::GET, "/cluster/resources", &[("type", "vm".into())]).await
    }

    /// A free VMID at the time of asking; it reserves nothing.
    pub async fn next_id(&self) -> Result<u32, ProxmoxError> {
        #[derive(Deserialize)]
        struct Id(#[serde(deserialize_with = "lenient_u64")] u64);
        let Id(id) = self.request(Method::GET, "/cluster/nextid", &[]).await?;
        u32::try_from(id).map_err(|_| ProxmoxError::Decode {
            method: "GET".into(),
            path: "/cluster/nextid".into(),
            message: format!("VMID {id} out of range"),
        })
    }

    /// Starts a clone of `template` as `newid`; the answer is the clone task. Not retried on its
    /// own: a clone whose answer was lost may have started, and the caller looks before it asks again.
    pub async fn clone_vm(&self, request: &CloneRequest<'_>) -> Result<Upid, ProxmoxError> {
        let mut params = vec![
            ("newid", request.newid.to_string()),
            ("name", request.name.to_string()),
            ("full", if request.full { "1" } else { "0" }.to_string()),
        ];
        if request.target != request.template_node {
            params.push(("target", request.target.to_string()));
        }
        if request.full && !request.storage.is_empty() {
            params.push(("storage", request.storage.to_string()));
        }
        let path = format!("/nodes/{}/qemu/{}/clone", request.template_node, request.template_vmid);
        let upid: String = self.request_once(Method::POST, &path, &params).await?;
        Upid::parse(&upid)
    }

    /// Sets config keys; PVE answers with a task (or nothing when it applied them at once).
    pub async fn configure(&self, node: &str, vmid: u32, params: &[(&str, String)]) -> Result<(), ProxmoxError> {
        let path = format!("/nodes/{node}/qemu/{vmid}/config");
        let upid: Option<String> = self.request(Method::POST, &path, params).await?;
        self.follow_optional(upid).await
    }

    pub async fn resize(&self, node: &str, vmid: u32, disk: &str, size: &str) -> Result<(), ProxmoxError> {
        let path = format!("/nodes/{node}/qemu/{vmid}/resize");
        let upid: Option<String> =
            self.request(Method::PUT, &path, &[("disk", disk.to_string()), ("size", size.to_string())]).await?;
        self.follow_optional(upid).await
    }

    pub async fn status(&self, node: &str, vmid: u32) -> Result<VmStatus, ProxmoxError> {
        self.request(Method::GET, &format!("/nodes/{node}/qemu/{vmid}/status/current"), &[]).await
    }

    /// Runs one `status/<action>` and follows its task.
    pub async fn power(
        &self,
        node: &str,
        vmid: u32,
        action: &str,
        params: &[(&str, String)],
    ) -> Result<(), ProxmoxError> {
        let path = format!("/nodes/{node}/qemu/{vmid}/status/{action}");
        let upid: String = self.request(Method::POST, &path, params).await?;
        self.follow(&Upid::parse(&upid)?).await
    }

    /// Destroys a VM and its disks, and follows the task.
    pub async fn destroy(&self, node: &str, vmid: u32) -> Result<(), ProxmoxError> {
        let path = format!("/nodes/{node}/qemu/{vmid}");
        let params = [("purge", "1".to_string()), ("destroy-unreferenced-disks", "1".to_string())];
        let upid: String = self.request(Method::DELETE, &path, &params).await?;
        self.follow(&Upid::parse(&upid)?).await
    }

    async fn follow_optional(&self, upid: Option<String>) -> Result<(), ProxmoxError> {
        match upid {
            Some(text) if text.starts_with("UPID:") => self.follow(&Upid::parse(&text)?).await,
            _ => Ok(()),
        }
    }

    /// Follows a task on the node its UPID names until it stops, for up to `task_timeout`
    /// (`follow_for`). A `no such task` right after the task started is tolerated: the node may
    /// not list it yet.
    pub async fn follow_for(&self, upid: &Upid, timeout: Duration) -> Result<(), ProxmoxError> {
        let path = format!("/nodes/{}/tasks/{}/status", upid.node, encode(&upid.text));
        let started = Instant::now();
        // The task runs on whatever happens to the API meanwhile: while the API is unreachable
        // (for a while) keep asking; only a task seen running too long times out. A longer
        // outage surfaces to the caller, which can follow the same UPID again.
        let mut failing_since: Option<Instant> = None;
        // Polls start at `poll` and slow down to four times that for long tasks.
        let mut poll = self.poll;
        loop {
            match self.request_once::<TaskStatus>(Method::GET, &path, &[]).await {
                Ok(task) if task.status == "stopped" => {
                    let exit = task.exitstatus.unwrap_or_default();
                    return if exit == "OK" || exit.starts_with("WARNINGS") {
                        Ok(())
                    } else {
                        Err(ProxmoxError::Task { upid: upid.text.clone(), exitstatus: exit })
                    };
                }
                Ok(_) => {
                    failing_since = None;
                    if started.elapsed() > timeout {
                        return Err(ProxmoxError::TaskTimeout { upid: upid.text.clone(), waited: started.elapsed() });
                    }
                }
                Err(e) if e.text().contains("no such task") => {
                    if started.elapsed() >= NO_SUCH_TASK_GRACE.min(timeout) {
                        return Err(e);
                    }
                    tracing::debug!(upid = %upid.text, "task not listed yet");
                }
                Err(e) if e.is_transient() && failing_since.is_none_or(|t| t.elapsed() < self.call_retry_for()) => {
                    failing_since.get_or_insert_with(Instant::now);
                    tracing::debug!(upid = %upid.text, error = %e, "task status unavailable; asking again");
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(poll).await;
            poll = poll.mul_f64(1.5).min(self.poll * 4);
        }
    }

    pub async fn follow(&self, upid: &Upid) -> Result<(), ProxmoxError> {
        self.follow_for(upid, self.task_timeout()).await
    }

    /// How long one call retries: `retry_for`, at most 15 s. Longer outages surface to the
    /// caller, whose state machine records them and tries again.
    fn call_retry_for(&self) -> Duration {
        self.retry_for.min(Duration::from_secs(15))
    }

    fn task_timeout(&self) -> Duration {
        self.task_timeout
    }
}

/// How long a task just started may be unknown to its node (`no such task`).
const NO_SUCH_TASK_GRACE: Duration = Duration::from_secs(10);

/// What to clone where.
#[derive(Debug, Clone)]
pub struct CloneRequest<'a> {
    pub template_node: &'a str,
    pub template_vmid: u32,
    pub newid: u32,
    pub name: &'a str,
    pub target: &'a str,
    pub full: bool,
    pub storage: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_numbers_and_booleans() {
        let vm: VmResource = serde_json::from_value(serde_json::json!({
            "vmid": "105", "node": "pve1", "template": 1, "tags": "hexabase;hx-tenant-acme"
        }))
        .unwrap();
        assert_eq!((vm.vmid, vm.template), (105, true));
        assert_eq!(vm.tag_list(), ["hexabase", "hx-tenant-acme"]);
        let vm: VmResource =
            serde_json::from_value(serde_json::json!({"vmid": 7, "node": "n", "template": "0"})).unwrap();
        assert!(!vm.template);
        let node: NodeResource =
            serde_json::from_value(serde_json::json!({"node": "n", "maxmem": "1024", "mem": 1.5e2})).unwrap();
        assert_eq!((node.maxmem, node.mem), (1024, 150));
        assert!(serde_json::from_value::<VmResource>(serde_json::json!({"vmid": "x", "node": "n"})).is_err());
    }

    #[test]
    fn upids_name_their_node() {
        let upid = Upid::parse("UPID:pve2:0000A1B2:0001C3D4:65F0A1B2:qmclone:9000:root@pam!hexa:").unwrap();
        assert_eq!(upid.node, "pve2");
        assert!(Upid::parse("UPID::1:2:3:x:y:z:").is_err());
        assert!(Upid::parse("nope").is_err());
    }

    #[test]
    fn errors_are_classified_by_their_text() {
        let api = |status: u16, message: &str| ProxmoxError::Api {
            method: "POST".into(),
            path: "/x".into(),
            status,
            message: message.into(),
        };
        assert!(api(500, "VM 105 is locked (clone)").is_transient());
        assert!(api(500, "can't lock file '/var/lock/qemu-server/lock-9000.conf' - got timeout").is_lock());
        assert!(api(503, "Service Unavailable").is_transient());
        assert!(!api(500, "unable to create VM 105: config file already exists").is_transient());
        assert!(api(500, "unable to create VM 105: config file already exists").is_vmid_taken());
        assert!(!api(400, "Parameter verification failed.").is_transient());
        assert_eq!(encode_params(&[("a b", "x=1,y".into())]), "a%20b=x%3D1%2Cy");
    }
}

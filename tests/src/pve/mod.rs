//! A Proxmox VE emulator, written from the API documentation (`pve-docs`' API viewer, which
//! `../shared/reference/proxmox-ve/PVE-schema.json` is the data of) and held to that schema.
//!
//! It serves `/api2/json` over HTTPS with a self-signed certificate, as PVE does, and checks the
//! `PVEAPIToken` header. Parameters are checked against the schema ([`schema`]): an unknown or
//! ill-typed one is PVE's 400 `Parameter verification failed.` with a per-parameter `errors`
//! object. It has nodes, VMs and templates; clones, config changes, resizes, starts, shutdowns,
//! stops and destroys run as tasks with UPIDs that take time ([`Timings`]) and are listed on the
//! node the UPID names only after a moment (`no such task` before); a cloning VM is locked
//! (`VM 105 is locked (clone)`); `/cluster/nextid` reserves nothing. Faults are injected with
//! [`Fault`]: lock timeouts, nextid races, failing tasks, 5xx with the reason in the status line,
//! VMs that never boot, and the whole API down.
//!
//! Started VMs boot like cloud-init does ([`boot`]): the seed URL from the `smbios1` serial,
//! `meta-data`, `vendor-data` and `user-data` fetched, `write_files` applied under the VM's own
//! root, and a real `hexa-agent` started with the config written there and the VM's SMBIOS
//! identity in a sysfs fixture root.

pub mod boot;
pub mod qemu;
pub mod schema;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use schema::Matched;

pub const TOKEN: &str = "hexa@pve!coordinator=0b7e6a52-7d1c-4c3a-9a0f-5e1c2d3b4a59";

/// How long each kind of task takes.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub clone_full: Duration,
    pub clone_linked: Duration,
    pub config: Duration,
    pub resize: Duration,
    pub start: Duration,
    pub shutdown: Duration,
    pub stop: Duration,
    pub destroy: Duration,
    /// A new task is not listed (`no such task`) for this long.
    pub listed_after: Duration,
    /// Full clones share their node's storage: each clone already running on the target node
    /// makes a new one take this fraction longer.
    pub clone_contention: f64,
}

impl Timings {
    /// Short tasks, for tests.
    pub fn fast() -> Timings {
        let ms = Duration::from_millis;
        Timings {
            clone_full: ms(400),
            clone_linked: ms(150),
            config: ms(50),
            resize: ms(80),
            start: ms(150),
            shutdown: ms(150),
            stop: ms(50),
            destroy: ms(150),
            listed_after: ms(30),
            clone_contention: 0.0,
        }
    }

    /// Roughly what a small cluster with local SSDs takes for a 20 GiB template.
    pub fn realistic() -> Timings {
        let ms = Duration::from_millis;
        Timings {
            clone_full: ms(8000),
            clone_linked: ms(1500),
            config: ms(300),
            resize: ms(600),
            start: ms(1500),
            shutdown: ms(3000),
            stop: ms(800),
            destroy: ms(1500),
            listed_after: ms(100),
            clone_contention: 0.5,
        }
    }
}

/// Something to go wrong, once per `count`.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The next clone tasks fail as when the template's config lock could not be had.
    CloneLockTimeout { count: u32 },
    /// After answering `/cluster/nextid`, someone else creates a VM with that id at once.
    NextIdRace { count: u32 },
    /// The next tasks of `kind` (`qmstart`, `qmclone`, ...) fail with `message`.
    FailTask { kind: String, message: String, count: u32 },
    /// The next requests get `status` with `reason` in the status line and `{"data":null}`.
    Http { status: u16, reason: String, count: u32 },
    /// The next started VMs never run cloud-init (a broken image).
    NeverBoot { count: u32 },
}

#[derive(Debug, Clone)]
pub struct Vm {
    pub vmid: u32,
    pub node: String,
    pub name: String,
    pub template: bool,
    pub running: bool,
    pub lock: Option<String>,
    pub config: BTreeMap<String, String>,
    pub disk_gib: u64,
}

#[derive(Debug)]
struct Task {
    upid: String,
    node: String,
    kind: String,
    started: Instant,
    ends: Instant,
    /// Set when the task has ended: `OK` or the error.
    exitstatus: Option<String>,
    fails_with: Option<String>,
    effect: Effect,
}

#[derive(Debug, Clone)]
enum Effect {
    Cloned { vmid: u32 },
    Config { vmid: u32, params: BTreeMap<String, String> },
    Resized { vmid: u32, gib: u64 },
    Started { vmid: u32 },
    Stopped { vmid: u32 },
    Destroyed { vmid: u32 },
}

#[derive(Debug)]
struct PveNode {
    name: String,
    online: bool,
    maxmem: u64,
    mem: u64,
}

#[derive(Debug)]
struct World {
    nodes: Vec<PveNode>,
    vms: BTreeMap<u32, Vm>,
    tasks: Vec<Task>,
    faults: VecDeque<Fault>,
    pid: u32,
    /// Every call: (method, template).
    calls: Vec<(String, String)>,
    /// Each clone a VM asked for: (newid, name).
    clones: Vec<(u32, String)>,
}

/// What the emulator's VMs boot into.
pub type BootHook = Arc<
    dyn Fn(boot::BootRequest) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<boot::Booted>> + Send>>
        + Send
        + Sync,
>;

struct Shared {
    world: Mutex<World>,
    timings: Timings,
    down: AtomicBool,
    /// Tells open connections to drop when the API goes down.
    down_signal: tokio::sync::watch::Sender<bool>,
    requests: AtomicU64,
    boot: Mutex<Option<BootHook>>,
    booted: Mutex<BTreeMap<u32, boot::Booted>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("timings", &self.timings).finish_non_exhaustive()
    }
}

/// A running emulator.
#[derive(Debug, Clone)]
pub struct Pve {
    shared: Arc<Shared>,
    pub addr: SocketAddr,
    /// sha256 of the server certificate, `AA:BB:...`.
    pub fingerprint: String,
    /// PEM of the (self-signed) server certificate, usable as a CA file.
    pub cert_pem: String,
}

impl Pve {
    /// Starts an emulator with nodes `pve1` and `pve2` and, on `pve1`, a template per entry of
    /// `templates` (VMID, name).
    pub async fn start(timings: Timings, templates: &[(u32, &str)]) -> Pve {
        let mut vms = BTreeMap::new();
        for (vmid, name) in templates {
            let config = [("cores", "2"), ("memory", "2048"), ("scsi0", "local-lvm:base-disk-0,size=10G")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            vms.insert(
                *vmid,
                Vm {
                    vmid: *vmid,
                    node: "pve1".into(),
                    name: name.to_string(),
                    template: true,
                    running: false,
                    lock: None,
                    config,
                    disk_gib: 10,
                },
            );
        }
        let world = World {
            nodes: vec![
                PveNode { name: "pve1".into(), online: true, maxmem: 256 << 30, mem: 40 << 30 },
                PveNode { name: "pve2".into(), online: true, maxmem: 256 << 30, mem: 20 << 30 },
            ],
            vms,
            tasks: Vec::new(),
            faults: VecDeque::new(),
            pid: 4000,
            calls: Vec::new(),
            clones: Vec::new(),
        };
        let shared = Arc::new(Shared {
            world: Mutex::new(world),
            timings,
            down: AtomicBool::new(false),
            down_signal: tokio::sync::watch::channel(false).0,
            requests: AtomicU64::new(0),
            boot: Mutex::new(None),
            booted: Mutex::new(BTreeMap::new()),
        });
        let key = rcgen::KeyPair::generate().expect("key");
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("params");
        let cert = params.self_signed(&key).expect("self-signed certificate");
        let fingerprint = {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(cert.der());
            digest.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
        };
        let cert_pem = cert.pem();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocols")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = axum::Router::new().fallback(handle).with_state(shared.clone());
        let serving = shared.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                if serving.down.load(Ordering::SeqCst) {
                    drop(stream);
                    continue;
                }
                let acceptor = acceptor.clone();
                let app = app.clone();
                let mut down = serving.down_signal.subscribe();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else { return };
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
                    // Going down drops kept-alive connections too.
                    tokio::select! {
                        _ = connection => {}
                        _ = down.wait_for(|down| *down) => {}
                    }
                });
            }
        });
        let ticking = shared.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                finish_tasks(&ticking);
            }
        });
        Pve { shared, addr, fingerprint, cert_pem }
    }

    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// What booting VMs do; without a hook they run but boot nothing.
    pub fn set_boot(&self, hook: BootHook) {
        *self.shared.boot.lock().unwrap() = Some(hook);
    }

    pub fn inject(&self, fault: Fault) {
        self.shared.world.lock().unwrap().faults.push_back(fault);
    }

    /// Drops every connection while down.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
        self.shared.down_signal.send_replace(down);
    }

    /// The VMs that are not templates.
    pub fn vms(&self) -> Vec<Vm> {
        self.shared.world.lock().unwrap().vms.values().filter(|v| !v.template).cloned().collect()
    }

    /// Adds a VM not made by the coordinator (someone else's).
    pub fn add_foreign_vm(&self, vmid: u32, name: &str) {
        let mut world = self.shared.world.lock().unwrap();
        world.vms.insert(vmid, foreign(vmid, name));
    }

    /// Adds a VM, tagged `tags`, as if someone (or a coordinator before) had made it.
    pub fn add_vm(&self, vmid: u32, name: &str, tags: &str, running: bool) {
        let mut vm = foreign(vmid, name);
        vm.config.insert("tags".into(), tags.into());
        vm.running = running;
        self.shared.world.lock().unwrap().vms.insert(vmid, vm);
    }

    /// HTTP requests answered (including refused ones).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Calls by (method, path template).
    pub fn calls(&self) -> Vec<(String, String)> {
        self.shared.world.lock().unwrap().calls.clone()
    }

    /// Clones asked for, as (newid, name).
    pub fn clones(&self) -> Vec<(u32, String)> {
        self.shared.world.lock().unwrap().clones.clone()
    }

    /// Agents running in booted VMs, by VMID.
    pub fn booted(&self) -> Vec<u32> {
        self.shared.booted.lock().unwrap().keys().copied().collect()
    }

    /// Stops the agent in VM `vmid` while the VM keeps running (a hung guest).
    pub async fn hang(&self, vmid: u32) -> bool {
        let booted = self.shared.booted.lock().unwrap().remove(&vmid);
        match booted {
            Some(b) => {
                b.stop().await;
                true
            }
            None => false,
        }
    }

    /// Stops every VM's agent (end of a test).
    pub async fn shutdown_vms(&self) {
        let booted: Vec<boot::Booted> =
            std::mem::take(&mut *self.shared.booted.lock().unwrap()).into_values().collect();
        for b in booted {
            b.stop().await;
        }
    }
}

fn foreign(vmid: u32, name: &str) -> Vm {
    Vm {
        vmid,
        node: "pve2".into(),
        name: name.into(),
        template: false,
        running: false,
        lock: None,
        config: BTreeMap::new(),
        disk_gib: 4,
    }
}

/// Applies the effects of tasks whose time is up.
fn finish_tasks(shared: &Arc<Shared>) {
    let now = Instant::now();
    let mut starts = Vec::new();
    let mut stops = Vec::new();
    {
        let mut world = shared.world.lock().unwrap();
        let mut effects = Vec::new();
        for task in world.tasks.iter_mut().filter(|t| t.exitstatus.is_none() && t.ends <= now) {
            task.exitstatus = Some(task.fails_with.clone().unwrap_or_else(|| "OK".into()));
            effects.push((task.effect.clone(), task.fails_with.is_none()));
        }
        for (effect, ok) in effects {
            match effect {
                Effect::Cloned { vmid } => {
                    if ok {
                        if let Some(vm) = world.vms.get_mut(&vmid) {
                            vm.lock = None;
                        }
                    } else {
                        world.vms.remove(&vmid);
                    }
                }
                Effect::Config { vmid, params } if ok => {
                    if let Some(vm) = world.vms.get_mut(&vmid) {
                        vm.config.extend(params);
                    }
                }
                Effect::Resized { vmid, gib } if ok => {
                    if let Some(vm) = world.vms.get_mut(&vmid) {
                        vm.disk_gib = gib;
                    }
                }
                Effect::Started { vmid } if ok => {
                    if let Some(vm) = world.vms.get_mut(&vmid) {
                        vm.running = true;
                        starts.push(vm.clone());
                    }
                }
                Effect::Stopped { vmid } if ok => {
                    if let Some(vm) = world.vms.get_mut(&vmid) {
                        vm.running = false;
                    }
                    stops.push(vmid);
                }
                Effect::Destroyed { vmid } if ok => {
                    world.vms.remove(&vmid);
                    stops.push(vmid);
                }
                _ => {}
            }
        }
        // Tasks are kept a while for status queries, then forgotten.
        world.tasks.retain(|t| t.exitstatus.is_none() || now.duration_since(t.ends) < Duration::from_secs(600));
    }
    for vm in starts {
        let never = {
            let mut world = shared.world.lock().unwrap();
            take_fault(&mut world, |f| matches!(f, Fault::NeverBoot { .. }))
        };
        if never {
            tracing::info!(vmid = vm.vmid, "emulated VM never boots (injected)");
            continue;
        }
        let hook = shared.boot.lock().unwrap().clone();
        if let Some(hook) = hook {
            let shared = shared.clone();
            tokio::spawn(async move {
                let smbios1 = vm.config.get("smbios1").cloned().unwrap_or_default();
                let request = boot::BootRequest {
                    vmid: vm.vmid,
                    name: vm.name.clone(),
                    smbios1,
                    config: vm.config.clone(),
                    disk_gib: vm.disk_gib,
                };
                if let Some(booted) = hook(request).await {
                    shared.booted.lock().unwrap().insert(vm.vmid, booted);
                }
            });
        }
    }
    for vmid in stops {
        let booted = shared.booted.lock().unwrap().remove(&vmid);
        if let Some(booted) = booted {
            tokio::spawn(booted.stop());
        }
    }
}

/// Consumes one count of the first fault matching `which`.
fn take_fault(world: &mut World, which: impl Fn(&Fault) -> bool) -> bool {
    let Some(i) = world.faults.iter().position(which) else { return false };
    let last = match &mut world.faults[i] {
        Fault::CloneLockTimeout { count }
        | Fault::NextIdRace { count }
        | Fault::FailTask { count, .. }
        | Fault::Http { count, .. }
        | Fault::NeverBoot { count } => {
            *count = count.saturating_sub(1);
            *count == 0
        }
    };
    if last {
        world.faults.remove(i);
    }
    true
}

/// An error as PVE answers it: the message as the status line's reason phrase, and in the body.
fn error(status: u16, message: &str, body_message: bool) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body =
        if body_message { json!({"data": null, "message": format!("{message}\n")}) } else { json!({"data": null}) };
    let mut response = (code, axum::Json(body)).into_response();
    if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(message.replace(['\r', '\n'], " ").into_bytes()) {
        response.extensions_mut().insert(reason);
    }
    response
}

fn data(value: Value) -> Response {
    axum::Json(json!({ "data": value })).into_response()
}

fn parse_form(text: &str) -> BTreeMap<String, String> {
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let Some(path) = uri.path().strip_prefix("/api2/json") else {
        return error(501, "Method not implemented", false);
    };
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
    if auth != format!("PVEAPIToken={TOKEN}") {
        return error(401, "No ticket", false);
    }
    let mut world = shared.world.lock().unwrap();
    if let Some(Fault::Http { status, reason, .. }) =
        world.faults.iter().find(|f| matches!(f, Fault::Http { .. })).cloned()
    {
        take_fault(&mut world, |f| matches!(f, Fault::Http { .. }));
        return error(status, &reason, false);
    }
    let m = method.as_str().to_string();
    let (template, path_params) = match schema::schema().find(&m, path) {
        Matched::Ok { template, path_params } => {
            (template, path_params.into_iter().map(|(k, v)| (k, decode(&v))).collect::<BTreeMap<_, _>>())
        }
        Matched::NoMethod => return error(501, &format!("Method '{m} {path}' not implemented"), false),
        Matched::NoPath => return error(501, &format!("Method '{m} {path}' not implemented"), false),
    };
    let mut params = if m == "GET" || m == "DELETE" {
        parse_form(uri.query().unwrap_or(""))
    } else {
        parse_form(&String::from_utf8_lossy(&body))
    };
    let errors = schema::schema().check(&m, &template, &{
        let mut all = params.clone();
        all.extend(path_params.clone());
        all
    });
    if !errors.is_empty() {
        let mut response =
            (StatusCode::BAD_REQUEST, axum::Json(json!({"data": null, "errors": errors}))).into_response();
        if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(b"Parameter verification failed.".to_vec()) {
            response.extensions_mut().insert(reason);
        }
        return response;
    }
    world.calls.push((m.clone(), template.clone()));
    params.extend(path_params);
    api(&mut world, &shared.timings, &m, &template, &params)
}

fn vmid_of(params: &BTreeMap<String, String>, key: &str) -> u32 {
    params.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn missing_vm(node: &str, vmid: u32) -> Response {
    error(500, &format!("Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist"), true)
}

fn new_task(
    world: &mut World,
    timings: &Timings,
    node: &str,
    kind: &str,
    id: u32,
    took: Duration,
    effect: Effect,
) -> String {
    world.pid += 1;
    let now = Instant::now();
    let start = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let upid =
        format!("UPID:{node}:{:08X}:{:08X}:{:08X}:{kind}:{id}:hexa@pve!coordinator:", world.pid, world.pid * 7, start);
    let mut fails_with = None;
    if kind == "qmclone" && take_fault(world, |f| matches!(f, Fault::CloneLockTimeout { .. })) {
        fails_with = Some(format!("can't lock file '/var/lock/qemu-server/lock-{id}.conf' - got timeout"));
    }
    if let Some(Fault::FailTask { message, .. }) =
        world.faults.iter().find(|f| matches!(f, Fault::FailTask { kind: k, .. } if k == kind)).cloned()
    {
        take_fault(world, |f| matches!(f, Fault::FailTask { kind: k, .. } if k == kind));
        fails_with = Some(message);
    }
    world.tasks.push(Task {
        upid: upid.clone(),
        node: node.to_string(),
        kind: kind.to_string(),
        started: now + timings.listed_after,
        ends: now + took,
        exitstatus: None,
        fails_with,
        effect,
    });
    upid
}

fn api(
    world: &mut World,
    timings: &Timings,
    method: &str,
    template: &str,
    params: &BTreeMap<String, String>,
) -> Response {
    let node = params.get("node").cloned().unwrap_or_default();
    let vmid = vmid_of(params, "vmid");
    let on_node = |world: &World, vmid: u32| world.vms.get(&vmid).filter(|v| v.node == node).cloned();
    match (method, template) {
        ("GET", "/cluster/resources") => {
            let kind = params.get("type").map(String::as_str);
            let mut out = Vec::new();
            if kind.is_none() || kind == Some("node") {
                for n in &world.nodes {
                    // Running VMs use their memory.
                    let running: u64 = world
                        .vms
                        .values()
                        .filter(|v| v.running && v.node == n.name)
                        .map(|v| v.config.get("memory").and_then(|m| m.parse::<u64>().ok()).unwrap_or(512) << 20)
                        .sum();
                    out.push(json!({"id": format!("node/{}", n.name), "type": "node", "node": n.name,
                        "status": if n.online { "online" } else { "offline" },
                        "maxmem": n.maxmem, "mem": n.mem + running, "maxcpu": 64, "cpu": 0.05}));
                }
            }
            if kind.is_none() || kind == Some("vm") {
                for vm in world.vms.values() {
                    let mut entry = json!({"id": format!("qemu/{}", vm.vmid), "type": "qemu", "vmid": vm.vmid,
                        "node": vm.node, "name": vm.name, "status": if vm.running { "running" } else { "stopped" },
                        "template": if vm.template { 1 } else { 0 },
                        "maxmem": 2u64 << 30, "maxdisk": vm.disk_gib << 30});
                    if let Some(tags) = vm.config.get("tags") {
                        entry["tags"] = json!(tags);
                    }
                    if let Some(lock) = &vm.lock {
                        entry["lock"] = json!(lock);
                    }
                    out.push(entry);
                }
            }
            data(Value::Array(out))
        }
        ("GET", "/cluster/nextid") => {
            let mut id = 100;
            while world.vms.contains_key(&id) {
                id += 1;
            }
            if take_fault(world, |f| matches!(f, Fault::NextIdRace { .. })) {
                // Someone else's clone takes it right after we answered.
                world.vms.insert(id, foreign(id, &format!("someone-else-{id}")));
            }
            // PVE answers a string.
            data(json!(id.to_string()))
        }
        ("POST", "/nodes/{node}/qemu/{vmid}/clone") => {
            let Some(source) = on_node(world, vmid) else { return missing_vm(&node, vmid) };
            let newid = vmid_of(params, "newid");
            if world.vms.contains_key(&newid) {
                return error(500, &format!("unable to create VM {newid}: config file already exists"), true);
            }
            let target = params.get("target").cloned().unwrap_or_else(|| node.clone());
            let target = &target;
            if !world.nodes.iter().any(|n| &n.name == target && n.online) {
                return error(500, &format!("target node '{target}' does not exist or is offline"), true);
            }
            let full = params.get("full").is_some_and(|f| matches!(f.as_str(), "1" | "true" | "yes" | "on"));
            if !full && *target != node {
                return error(500, "Linked clone feature is not supported for drive 'scsi0' on another node", true);
            }
            let name = params.get("name").cloned().unwrap_or_else(|| format!("Copy-of-VM-{}", source.name));
            world.clones.push((newid, name.clone()));
            world.vms.insert(
                newid,
                Vm {
                    vmid: newid,
                    node: target.clone(),
                    name,
                    template: false,
                    running: false,
                    lock: Some("clone".into()),
                    config: source.config.clone(),
                    disk_gib: source.disk_gib,
                },
            );
            let running = world
                .tasks
                .iter()
                .filter(|t| t.kind == "qmclone" && t.exitstatus.is_none())
                .filter(|t| matches!(t.effect, Effect::Cloned { vmid } if world.vms.get(&vmid).is_some_and(|v| &v.node == target)))
                .count();
            let base = if full { timings.clone_full } else { timings.clone_linked };
            let took = base.mul_f64(1.0 + timings.clone_contention * running as f64);
            let upid = new_task(world, timings, &node, "qmclone", vmid, took, Effect::Cloned { vmid: newid });
            data(json!(upid))
        }
        ("POST", "/nodes/{node}/qemu/{vmid}/config") | ("PUT", "/nodes/{node}/qemu/{vmid}/config") => {
            let Some(vm) = on_node(world, vmid) else { return missing_vm(&node, vmid) };
            if let Some(lock) = &vm.lock {
                return error(500, &format!("VM {vmid} is locked ({lock})"), true);
            }
            let mut changes = params.clone();
            changes.remove("node");
            changes.remove("vmid");
            if method == "PUT" {
                if let Some(vm) = world.vms.get_mut(&vmid) {
                    vm.config.extend(changes);
                }
                return data(Value::Null);
            }
            let upid = new_task(
                world,
                timings,
                &node,
                "qmconfig",
                vmid,
                timings.config,
                Effect::Config { vmid, params: changes },
            );
            data(json!(upid))
        }
        ("PUT", "/nodes/{node}/qemu/{vmid}/resize") => {
            let Some(vm) = on_node(world, vmid) else { return missing_vm(&node, vmid) };
            if let Some(lock) = &vm.lock {
                return error(500, &format!("VM {vmid} is locked ({lock})"), true);
            }
            let size = params.get("size").cloned().unwrap_or_default();
            let gib = match size.strip_prefix('+') {
                Some(more) => vm.disk_gib + more.trim_end_matches('G').parse::<u64>().unwrap_or(0),
                None => size.trim_end_matches('G').parse::<u64>().unwrap_or(0),
            };
            if gib < vm.disk_gib {
                return error(500, "shrinking disks is not supported", true);
            }
            let upid = new_task(world, timings, &node, "resize", vmid, timings.resize, Effect::Resized { vmid, gib });
            data(json!(upid))
        }
        ("GET", "/nodes/{node}/qemu/{vmid}/status/current") => {
            let Some(vm) = on_node(world, vmid) else { return missing_vm(&node, vmid) };
            let mut out = json!({"vmid": vm.vmid, "name": vm.name, "status": if vm.running { "running" } else { "stopped" },
                "qmpstatus": if vm.running { "running" } else { "stopped" }, "cpus": 2, "maxmem": 2u64 << 30});
            if let Some(lock) = &vm.lock {
                out["lock"] = json!(lock);
            }
            data(out)
        }
        ("POST", "/nodes/{node}/qemu/{vmid}/status/start") => {
            let Some(vm) = on_node(world, vmid) else { return missing_vm(&node, vmid) };
            if let Some(lock) = &vm.lock {
                return error(500, &format!("VM {vmid} is locked ({lock})"), true);
            }
            if vm.template {
                return error(500, "you can't start a vm if it's a template", true);
            }
            if vm.running {
                return error(500, &format!("VM {vmid} already running"), true);
            }
            let upid = new_task(world, timings, &node, "qmstart", vmid, timings.start, Effect::Started { vmid });
            data(json!(upid))
        }
        ("POST", "/nodes/{node}/qemu/{vmid}/status/shutdown") | ("POST", "/nodes/{node}/qemu/{vmid}/status/stop") => {
            let Some(vm) = on_node(world, vmid) else { return missing_vm(&node, vmid) };
            if let Some(lock) = &vm.lock {
                return error(500, &format!("VM {vmid} is locked ({lock})"), true);
            }
            let (kind, took) = if template.ends_with("shutdown") {
                ("qmshutdown", timings.shutdown)
            } else {
                ("qmstop", timings.stop)
            };
            let upid = new_task(world, timings, &node, kind, vmid, took, Effect::Stopped { vmid });
            if !vm.running {
                // Stopping a stopped VM is a task that fails, as PVE's does.
                if let Some(task) = world.tasks.last_mut() {
                    task.fails_with = Some(format!("VM {vmid} not running"));
                }
            }
            data(json!(upid))
        }
        ("DELETE", "/nodes/{node}/qemu/{vmid}") => {
            let Some(vm) = on_node(world, vmid) else { return missing_vm(&node, vmid) };
            if let Some(lock) = &vm.lock {
                return error(500, &format!("VM {vmid} is locked ({lock})"), true);
            }
            if vm.running {
                return error(500, &format!("VM {vmid} is running - destroy failed"), true);
            }
            let upid = new_task(world, timings, &node, "qmdestroy", vmid, timings.destroy, Effect::Destroyed { vmid });
            data(json!(upid))
        }
        ("GET", "/nodes/{node}/tasks/{upid}/status") => {
            let upid = params.get("upid").cloned().unwrap_or_default();
            let now = Instant::now();
            let Some(task) = world.tasks.iter().find(|t| t.upid == upid && t.node == node && t.started <= now) else {
                return error(500, &format!("no such task '{upid}'"), true);
            };
            let mut out = json!({"upid": task.upid, "node": task.node, "type": task.kind, "id": "",
                "pid": 1, "pstart": 1, "starttime": 1, "user": "hexa@pve!coordinator",
                "status": if task.exitstatus.is_some() { "stopped" } else { "running" }});
            if let Some(exit) = &task.exitstatus {
                out["exitstatus"] = json!(exit);
            }
            data(out)
        }
        _ => error(501, &format!("Method '{method} {template}' not implemented in the emulator"), false),
    }
}

/// The directory emulated VMs keep their roots in.
pub fn vm_root(base: &std::path::Path, vmid: u32) -> PathBuf {
    base.join(format!("vm-{vmid}"))
}

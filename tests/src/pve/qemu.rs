//! A VM start that boots for real: the template image `scripts/vm-image` builds (Debian 12,
//! systemd, cloud-init limited to NoCloud, the cloud kernel, the QEMU guest agent, no hexa-agent)
//! under qemu (TCG), with the VM's `smbios1` as Proxmox passes it (`-smbios type=1,uuid=...,
//! serial=ds=nocloud;s=<seed>;dsmode=net`, the serial decoded from base64), its `cores` and
//! `memory`, a copy-on-write overlay of the image as its disk (sized as the VM's disk), a
//! user-mode network and the guest agent's channel (`org.qemu.guest_agent.0`) on a unix socket.
//!
//! qemu's user-mode network shows the guest the host's loopback at 10.0.2.2; the tests run qemu
//! inside a network namespace of their own ([`crate::netns::Isolated`]), so that loopback is the
//! namespace's, where the coordinator, its seed server and the emulator listen, and the guest
//! reaches nothing else. Stopping or destroying the VM kills qemu and removes its overlay; so does
//! dropping the runtime that runs it (a failed test).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::watch;

use super::BootHook;
use super::boot::{BootRequest, Booted, parse_smbios1};

/// The address the guest sees the namespace's loopback at.
pub const HOST_FROM_GUEST: &str = "10.0.2.2";

/// Why a real boot cannot run here (not root, or a tool missing), or `None`.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root (network namespaces, and mmdebstrap for the image)".into());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for (tool, package) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("qemu-img", "qemu-utils"),
        ("mmdebstrap", "mmdebstrap"),
        ("mke2fs", "e2fsprogs"),
        ("ip", "iproute2"),
    ] {
        if !std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()) {
            return Some(format!("needs `{tool}`: apt-get install -y {package}"));
        }
    }
    None
}

/// The workspace this test crate is part of.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The template: a partition-less root file system and the kernel and initrd taken from it.
#[derive(Debug, Clone)]
pub struct Image {
    pub root: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Builds the template with `scripts/vm-image` (cached under `target/vm/`), or finds it built.
pub fn image() -> Result<Image, String> {
    let script = workspace().join("scripts/vm-image");
    let out = std::process::Command::new(&script)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("{} failed ({}): {stdout}", script.display(), out.status));
    }
    let dir = workspace().join(stdout.lines().last().unwrap_or_default().trim());
    let image = Image { root: dir.join("root.img"), kernel: dir.join("vmlinuz"), initrd: dir.join("initrd.img") };
    for file in [&image.root, &image.kernel, &image.initrd] {
        if !file.is_file() {
            return Err(format!("{} did not make {}", script.display(), file.display()));
        }
    }
    Ok(image)
}

/// The agent's Debian package built from this checkout (`scripts/package`), the newest if several.
pub fn agent_deb() -> Result<PathBuf, String> {
    let dir = workspace().join("target/debian");
    let mut debs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}: build the package first with scripts/package", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            name.starts_with("hexa-agent_") && name.ends_with(".deb")
        })
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    debs.sort();
    debs.pop().map(|(_, p)| p).ok_or_else(|| format!("no hexa-agent_*.deb in {}: run scripts/package", dir.display()))
}

/// A VM running under qemu, as the tests see it.
#[derive(Debug, Clone)]
pub struct Guest {
    pub vmid: u32,
    pub name: String,
    pub pid: u32,
    /// Its disk: a qcow2 overlay over the template.
    pub overlay: PathBuf,
    /// The guest agent's socket.
    pub agent: PathBuf,
    /// The serial console, kept after the VM is gone.
    pub console: PathBuf,
    pub started: Instant,
}

/// The VMs qemu runs, by VMID.
#[derive(Debug, Clone, Default)]
pub struct Guests(Arc<Mutex<BTreeMap<u32, Guest>>>);

impl Guests {
    pub fn get(&self, vmid: u32) -> Option<Guest> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get(&vmid).cloned()
    }

    pub fn all(&self) -> Vec<Guest> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    fn remove(&self, vmid: u32) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&vmid);
    }
}

/// A boot hook that starts each VM under qemu from `image`; consoles go to `logs`.
pub fn qemu_boot(image: Image, logs: PathBuf, guests: Guests) -> BootHook {
    Arc::new(move |request: BootRequest| {
        let image = image.clone();
        let logs = logs.clone();
        let guests = guests.clone();
        Box::pin(async move {
            match start(&image, &logs, &guests, &request).await {
                Ok(booted) => Some(booted),
                Err(e) => {
                    tracing::error!(vmid = request.vmid, error = %e, "qemu VM did not start");
                    None
                }
            }
        })
    })
}

async fn start(image: &Image, logs: &Path, guests: &Guests, request: &BootRequest) -> Result<Booted, String> {
    let vmid = request.vmid;
    let fields = parse_smbios1(&request.smbios1);
    let uuid = fields.get("uuid").cloned().ok_or("no SMBIOS uuid in smbios1")?;
    let serial = fields.get("serial").cloned().unwrap_or_default();
    // qemu's option syntax doubles commas; a Proxmox serial holds none, and must not break out.
    if uuid.contains(',') || serial.contains(',') {
        return Err(format!("smbios1 fields with commas: {uuid:?} {serial:?}"));
    }
    let cores: u32 = request.config.get("cores").and_then(|c| c.parse().ok()).unwrap_or(1);
    let memory: u64 = request.config.get("memory").and_then(|m| m.parse().ok()).unwrap_or(2048);
    let run = tempfile::Builder::new()
        .prefix(&format!("hexa-vm-{vmid}-"))
        .tempdir()
        .map_err(|e| format!("VM directory: {e}"))?;
    let overlay = run.path().join("disk.qcow2");
    let created = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&image.root)
        .arg(&overlay)
        .arg(format!("{}G", request.disk_gib.max(4)))
        .output()
        .await
        .map_err(|e| format!("qemu-img: {e}"))?;
    if !created.status.success() {
        return Err(format!("qemu-img create: {}", String::from_utf8_lossy(&created.stderr)));
    }
    std::fs::create_dir_all(logs).map_err(|e| format!("{}: {e}", logs.display()))?;
    let console = logs.join(format!("vm-{vmid}-console.log"));
    let agent = run.path().join("qga.sock");
    let qemu_log = std::fs::File::create(logs.join(format!("vm-{vmid}-qemu.log"))).map_err(|e| e.to_string())?;
    let mut command = tokio::process::Command::new("qemu-system-x86_64");
    command
        .args(["-name", &request.name, "-accel", "tcg", "-cpu", "max", "-nodefaults", "-display", "none"])
        .args(["-smp", &cores.to_string(), "-m", &memory.to_string()])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .args(["-append", "root=/dev/vda rw console=ttyS0 net.ifnames=0"])
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=qcow2,discard=unmap", overlay.display()))
        .args(["-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0"])
        .arg("-smbios")
        .arg(format!("type=1,uuid={uuid},serial={serial}"))
        .arg("-chardev")
        .arg(format!("socket,id=qga0,path={},server=on,wait=off", agent.display()))
        .args(["-device", "virtio-serial-pci", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdin(std::process::Stdio::null())
        .stdout(qemu_log.try_clone().map_err(|e| e.to_string())?)
        .stderr(qemu_log)
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| format!("cannot start qemu-system-x86_64: {e}"))?;
    let pid = child.id().unwrap_or_default();
    tracing::info!(vmid, pid, cores, memory, "qemu VM started");
    guests.0.lock().unwrap_or_else(|p| p.into_inner()).insert(
        vmid,
        Guest {
            vmid,
            name: request.name.clone(),
            pid,
            overlay: overlay.clone(),
            agent,
            console,
            started: Instant::now(),
        },
    );
    let (stop, mut stopped) = watch::channel(false);
    let guests = guests.clone();
    let task = tokio::spawn(async move {
        tokio::select! {
            _ = stopped.changed() => {}
            status = child.wait() => tracing::warn!(vmid, ?status, "qemu exited on its own"),
        }
        // Power off: the guest goes away at once, as `qm stop` does it.
        let _ = child.start_kill();
        let _ = child.wait().await;
        guests.remove(vmid);
        drop(run);
        Ok(())
    });
    Ok(Booted::new(request.name.clone(), stop, task))
}

/// What a command run in the guest did.
#[derive(Debug, Clone)]
pub struct Exec {
    pub code: i64,
    pub stdout: String,
    pub stderr: String,
}

/// One request on the guest agent's channel and its answer (its `return`).
async fn call(stream: &mut BufReader<UnixStream>, request: &Value, wait: Duration) -> Result<Value, String> {
    let line = format!("{request}\n");
    stream.get_mut().write_all(line.as_bytes()).await.map_err(|e| format!("guest agent: {e}"))?;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let mut buf = Vec::new();
        let read = tokio::time::timeout_at(deadline, stream.read_until(b'\n', &mut buf))
            .await
            .map_err(|_| format!("guest agent: no answer to {request} within {wait:?}"))?
            .map_err(|e| format!("guest agent: {e}"))?;
        if read == 0 {
            return Err("guest agent: channel closed".into());
        }
        // Answers can carry a 0xFF sync byte first; anything before the JSON is skipped.
        let Some(at) = buf.iter().position(|b| *b == b'{') else { continue };
        let Ok(answer) = serde_json::from_slice::<Value>(&buf[at..]) else { continue };
        if let Some(value) = answer.get("return") {
            return Ok(value.clone());
        }
        if let Some(error) = answer.get("error") {
            return Err(format!("guest agent refused {request}: {error}"));
        }
    }
}

/// Opens the channel and makes sure the answers that follow are ours (`guest-sync`).
async fn connect(socket: &Path) -> Result<BufReader<UnixStream>, String> {
    let stream = UnixStream::connect(socket).await.map_err(|e| format!("{}: {e}", socket.display()))?;
    let mut stream = BufReader::new(stream);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    let id = (u64::from(std::process::id()) << 30) | u64::from(nanos);
    // A newline ends whatever half request an earlier client left.
    stream.get_mut().write_all(b"\n").await.map_err(|e| format!("guest agent: {e}"))?;
    let request = json!({"execute": "guest-sync", "arguments": {"id": id}});
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match call(&mut stream, &request, Duration::from_secs(3)).await {
            Ok(value) if value == json!(id) => return Ok(stream),
            Ok(_) => {}
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(e) if e.contains("no answer") => return Err(e),
            Err(_) => {}
        }
    }
}

/// Runs `script` with `/bin/sh -c` in the guest through its agent and returns what it printed.
pub async fn exec(socket: &Path, script: &str, within: Duration) -> Result<Exec, String> {
    let mut stream = connect(socket).await?;
    let request = json!({"execute": "guest-exec",
        "arguments": {"path": "/bin/sh", "arg": ["-c", script], "capture-output": true}});
    let pid = call(&mut stream, &request, Duration::from_secs(10)).await?["pid"].clone();
    let deadline = Instant::now() + within;
    loop {
        let status = json!({"execute": "guest-exec-status", "arguments": {"pid": pid}});
        let status = call(&mut stream, &status, Duration::from_secs(10)).await?;
        if status["exited"] == json!(true) {
            let text = |key: &str| {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(status[key].as_str().unwrap_or_default())
                    .unwrap_or_default();
                String::from_utf8_lossy(&bytes).into_owned()
            };
            return Ok(Exec {
                code: status["exitcode"].as_i64().unwrap_or(-1),
                stdout: text("out-data"),
                stderr: text("err-data"),
            });
        }
        if Instant::now() > deadline {
            return Err(format!("`{script}` did not finish in the guest within {within:?}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the guest agent answers.
pub async fn wait_for_agent(socket: &Path, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        match exec(socket, "true", Duration::from_secs(10)).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(format!("guest agent not up within {within:?}: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

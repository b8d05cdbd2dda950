//! Test doubles for the installer: a local artifact server with K3s' release layout that can be
//! told to misbehave, stand-in `k3s` executables, and a way to see everything under a root.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use hexa_shared::k3s::{ArtifactSource, JoinToken, K3sRole, K3sSpec};

use super::fetch::{Arch, FetchPolicy, Fetcher};

/// Installs the TLS crypto provider: reqwest's client needs one even for plain http.
pub fn init() {
    hexa_shared::install_crypto_provider();
}

/// A stand-in `k3s`: a shell script that says which version it is. Long enough that a truncated
/// transfer is visibly short.
pub fn stand_in(version: &str, arch: &str) -> Vec<u8> {
    format!("#!/bin/sh\n# stand-in k3s {version} {arch}{}\necho \"k3s stand-in {version}\"\n", " padding".repeat(30))
        .into_bytes()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// How the server misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// The checksum files list hashes of other contents.
    WrongChecksum,
    /// Binary responses announce their full length and stop after this many bytes.
    Truncate(usize),
    /// Every request gets 404.
    NotFound,
    /// Every request is read and never answered.
    HangHeaders,
    /// Binary responses send their headers and half their body, then nothing.
    HangBody,
}

/// A request the server saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
}

#[derive(Debug)]
struct ServerState {
    files: BTreeMap<String, Vec<u8>>,
    fault: Fault,
    seen: Vec<Seen>,
}

/// An HTTP/1.1 server with K3s' release layout under `/releases`: `<base>/<version>/k3s`,
/// `k3s-arm64`, `sha256sum-amd64.txt`, `sha256sum-arm64.txt`. Honours `Range: bytes=N-`.
#[derive(Debug)]
pub struct ArtifactServer {
    pub base: String,
    state: Arc<Mutex<ServerState>>,
    task: tokio::task::JoinHandle<()>,
}

/// The files of a release of stand-ins, keyed by their path under the base.
pub fn release_files(version: &str) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for (arch, binary) in [("amd64", "k3s"), ("arm64", "k3s-arm64")] {
        let bytes = stand_in(version, arch);
        let listing =
            format!("{}  {binary}\n{}  k3s-airgap-images-{arch}.tar.zst\n", sha256_hex(&bytes), sha256_hex(b"images"));
        files.insert(format!("{version}/{binary}"), bytes);
        files.insert(format!("{version}/sha256sum-{arch}.txt"), listing.into_bytes());
    }
    files
}

impl ArtifactServer {
    pub async fn start(versions: &[&str]) -> ArtifactServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/releases", listener.local_addr().unwrap());
        let files = versions.iter().flat_map(|v| release_files(v)).collect();
        let state = Arc::new(Mutex::new(ServerState { files, fault: Fault::None, seen: Vec::new() }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, shared.clone()));
            }
        });
        ArtifactServer { base, state, task }
    }

    pub fn set_fault(&self, fault: Fault) {
        self.state.lock().unwrap().fault = fault;
    }

    /// Requests seen since the last call.
    pub fn take_requests(&self) -> Vec<Seen> {
        std::mem::take(&mut self.state.lock().unwrap().seen)
    }

    pub fn source(&self) -> ArtifactSource {
        ArtifactSource::Url { base: self.base.clone(), sha256: None }
    }
}

impl Drop for ArtifactServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, state: Arc<Mutex<ServerState>>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 16 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let path = head.split_whitespace().nth(1).unwrap_or_default().to_string();
    let range = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("range").then(|| value.trim().to_string())
    });
    let (fault, file) = {
        let mut state = state.lock().unwrap();
        state.seen.push(Seen { path: path.clone(), range: range.clone() });
        let key = path.strip_prefix("/releases/").unwrap_or_default();
        (state.fault, state.files.get(key).cloned())
    };
    let is_binary = !path.ends_with(".txt");
    let reply = |status: &str, headers: String, body_len: usize| {
        format!("HTTP/1.1 {status}\r\nContent-Length: {body_len}\r\nConnection: close\r\n{headers}\r\n")
    };
    let Some(mut body) = file.filter(|_| fault != Fault::NotFound) else {
        let _ = stream.write_all(reply("404 Not Found", String::new(), 9).as_bytes()).await;
        let _ = stream.write_all(b"not found").await;
        return;
    };
    if fault == Fault::HangHeaders {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        return;
    }
    if fault == Fault::WrongChecksum && !is_binary {
        let text = String::from_utf8_lossy(&body).into_owned();
        body = text
            .lines()
            .map(|line| format!("{}{}\n", sha256_hex(line.as_bytes()), &line[64..]))
            .collect::<String>()
            .into_bytes();
    }
    let total = body.len();
    let offset = range.as_deref().and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse::<usize>().ok());
    let (status, headers, part) = match offset {
        Some(offset) if offset >= total => {
            let head = reply("416 Range Not Satisfiable", format!("Content-Range: bytes */{total}\r\n"), 0);
            let _ = stream.write_all(head.as_bytes()).await;
            return;
        }
        Some(offset) => (
            "206 Partial Content",
            format!("Content-Range: bytes {offset}-{}/{total}\r\n", total - 1),
            body[offset..].to_vec(),
        ),
        None => ("200 OK", String::new(), body),
    };
    if stream.write_all(reply(status, headers, part.len()).as_bytes()).await.is_err() {
        return;
    }
    match fault {
        Fault::Truncate(n) if is_binary => {
            let _ = stream.write_all(&part[..n.min(part.len())]).await;
            let _ = stream.flush().await;
            // Dropping the stream closes the connection short of the announced length.
        }
        Fault::HangBody if is_binary => {
            let _ = stream.write_all(&part[..part.len() / 2]).await;
            let _ = stream.flush().await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        _ => {
            let _ = stream.write_all(&part).await;
            let _ = stream.flush().await;
        }
    }
}

/// A policy that gives up fast: tests wait milliseconds, not minutes.
pub fn quick_policy() -> FetchPolicy {
    FetchPolicy {
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_millis(400),
        idle_timeout: Duration::from_millis(400),
        attempts: 3,
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        progress_every: Duration::ZERO,
        max_binary_bytes: 1 << 20,
    }
}

pub fn fetcher(policy: FetchPolicy) -> Fetcher {
    Fetcher::new(Arch::Amd64, policy).unwrap()
}

pub const V1: &str = "v1.35.4+k3s1";
pub const V2: &str = "v1.35.5+k3s1";

/// The first server of a cluster, with a label and reservations.
pub fn server_spec(source: ArtifactSource, version: &str) -> K3sSpec {
    let mut spec = K3sSpec {
        token: Some(JoinToken::new("K10f00d::server:0123456789abcdef")),
        version: version.to_string(),
        artifacts: source,
        ..K3sSpec::new(K3sRole::Server { cluster_init: true, server_url: None })
    };
    spec.node_labels.insert("hexabase.ai/pool".into(), "server".into());
    spec.kubelet_args.insert("system-reserved".into(), "cpu=1,memory=2Gi".into());
    spec.kubelet_args.insert("eviction-hard".into(), "memory.available<500Mi".into());
    spec
}

/// A dedicated node's agent (the same spec the rendering tests snapshot), installing `version`
/// from `source`.
pub fn agent_spec(source: ArtifactSource, version: &str) -> K3sSpec {
    K3sSpec { version: version.to_string(), artifacts: source, ..super::render::tests::dedicated_agent() }
}

/// One entry under a root: a directory, or a file with its mode, size and modification time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir,
    File { mode: u32, len: u64, mtime: (i64, i64) },
}

/// Everything under `root`, keyed by path relative to it.
pub fn tree(root: &Path) -> BTreeMap<PathBuf, Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Entry>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            if meta.is_dir() {
                out.insert(rel, Entry::Dir);
                walk(root, &path, out);
            } else {
                out.insert(
                    rel,
                    Entry::File {
                        mode: meta.permissions().mode() & 0o7777,
                        len: meta.len(),
                        mtime: (meta.mtime(), meta.mtime_nsec()),
                    },
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The files (not directories) under `root` with their modes.
pub fn files_with_modes(root: &Path) -> BTreeMap<String, u32> {
    tree(root)
        .into_iter()
        .filter_map(|(path, entry)| match entry {
            Entry::File { mode, .. } => Some((path.display().to_string(), mode)),
            Entry::Dir => None,
        })
        .collect()
}

/// Runs the k3s installed under `root` and returns what it printed.
pub fn run_installed(root: &Path) -> String {
    let output = std::process::Command::new(root.join("usr/local/bin/k3s")).output().unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// Reads a node path under `root`.
pub fn read(root: &Path, node_path: &str) -> String {
    std::fs::read_to_string(root.join(node_path.trim_start_matches('/'))).unwrap()
}

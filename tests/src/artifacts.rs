//! A K3s release server on loopback, laid out as K3s' GitHub releases are
//! (`/<version>/k3s`, `/<version>/sha256sum-amd64.txt`), serving a stand-in `k3s` executable.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The stand-in: `k3s kubectl ... get node NAME ...` answers that the node is Ready; anything else
/// prints what it was asked, like a daemon that started.
pub fn stand_in_k3s(version: &str) -> String {
    format!(
        "#!/bin/sh\n# stand-in k3s {version}\ncase \"$1\" in\n  kubectl) printf True ;;\n  --version) echo 'k3s version {version}' ;;\n  *) echo \"k3s {version} $*\" ;;\nesac\n"
    )
}

#[derive(Debug)]
pub struct ReleaseServer {
    pub base: String,
    pub dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ReleaseServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ReleaseServer {
    /// Serves releases `versions` of the stand-in.
    pub async fn start(versions: &[&str]) -> ReleaseServer {
        let dir = tempfile::tempdir().expect("tempdir");
        for version in versions {
            let release = dir.path().join(version);
            std::fs::create_dir_all(&release).expect("release dir");
            let binary = stand_in_k3s(version);
            std::fs::write(release.join("k3s"), &binary).expect("write k3s");
            let sum = hex::encode(Sha256::digest(binary.as_bytes()));
            std::fs::write(release.join("sha256sum-amd64.txt"), format!("{sum}  k3s\n")).expect("write sums");
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let root = dir.path().to_path_buf();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, root.clone()));
            }
        });
        ReleaseServer { base, dir, task }
    }

    /// The sha256 of `version`'s binary, as an operator pins it (`[k3s] sha256`) when serving a
    /// release over plain http.
    pub fn sha256(&self, version: &str) -> String {
        let listing = std::fs::read_to_string(self.dir.path().join(version).join("sha256sum-amd64.txt"))
            .expect("the release's checksum file");
        listing.split_whitespace().next().unwrap_or_default().to_string()
    }
}

/// One HTTP/1.1 GET: the file under `root`, or 404. Enough for the installer's client.
async fn serve(mut stream: tokio::net::TcpStream, root: PathBuf) {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&request);
    let path = text.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/').to_string();
    let file = root.join(&path);
    let response = match (path.contains(".."), std::fs::read(Path::new(&file))) {
        (false, Ok(body)) => {
            let mut head =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).into_bytes();
            head.extend_from_slice(&body);
            head
        }
        _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
    };
    let _ = stream.write_all(&response).await;
    let _ = stream.shutdown().await;
}

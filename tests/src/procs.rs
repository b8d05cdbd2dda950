//! The real binaries as child processes, so that tests can `kill -9` them. Each process's stderr
//! goes to a log file the test can read.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub stdout: PathBuf,
}

impl Proc {
    pub fn spawn(program: &Path, args: &[String], log: PathBuf) -> Proc {
        let stdout = log.with_extension("out");
        let err = File::create(&log).expect("log file");
        let out = File::create(&stdout).expect("stdout file");
        let child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Proc { child, log, stdout }
    }

    /// SIGKILL: no chance to close connections or flush anything.
    pub fn kill9(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// Writes a coordinator config with fast health thresholds and returns its path.
pub fn fast_coordinator_config(dir: &Path, quic_port: u16, admin_port: u16) -> PathBuf {
    let path = dir.join("coordinator.toml");
    let text = format!(
        "state_dir = \"{}\"\nquic_listen = \"127.0.0.1:{quic_port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n\
         report_interval = \"300ms\"\nunreachable_after = \"1s\"\nlost_after = \"3s\"\n[k3s]\nmanage = false\n[hostcluster]\nmode = \"off\"\n[isolation]\nenabled = false\n",
        dir.join("state").display()
    );
    std::fs::write(&path, text).expect("write coordinator config");
    path
}

/// A coordinator process on fixed loopback ports (so it can be restarted where agents expect it).
#[derive(Debug)]
pub struct CoordinatorProc {
    pub proc: Proc,
    pub quic_addr: std::net::SocketAddr,
    pub ca_hash: hexa_shared::pki::CaHash,
    pub admin: crate::admin::AdminClient,
}

impl CoordinatorProc {
    /// Starts an agent for each of `names`, each enrolling with a shared-pool token of its own
    /// (state and log under `dir`).
    pub async fn spawn_shared_agents(&self, dir: &Path, names: &[&str]) -> Vec<Proc> {
        let ca = self.ca_hash.to_string();
        let mut agents = Vec::new();
        for name in names {
            let token = self.admin.token("shared", "10m").await;
            agents.push(spawn_agent(dir, name, self.quic_addr, &token, &ca));
        }
        agents
    }

    /// Waits until exactly `count` nodes are listed and every one is Ready.
    pub async fn wait_ready(&self, count: usize) {
        crate::eventually(std::time::Duration::from_secs(30), &format!("{count} nodes Ready"), async || {
            let nodes = self.admin.nodes().await;
            (nodes.len() == count && nodes.iter().all(|n| n.health == hexa_coordinator::store::Health::Ready))
                .then_some(())
        })
        .await;
    }

    /// Starts `hexa-coordinator --config <dir>/coordinator.toml` and waits until it serves.
    pub async fn start(dir: &Path, quic_port: u16, admin_port: u16, log_name: &str) -> CoordinatorProc {
        let config = fast_coordinator_config(dir, quic_port, admin_port);
        Self::start_with(dir, &config, quic_port, admin_port, log_name).await
    }

    /// Starts `hexa-coordinator --config <config>`, a config whose state directory is `<dir>/state`.
    pub async fn start_with(
        dir: &Path,
        config: &Path,
        quic_port: u16,
        admin_port: u16,
        log_name: &str,
    ) -> CoordinatorProc {
        let proc = Proc::spawn(
            &crate::bin("hexa-coordinator"),
            &["--config".into(), config.display().to_string()],
            dir.join(log_name),
        );
        let ca_hash =
            crate::eventually(std::time::Duration::from_secs(20), "coordinator start-up output", async || {
                proc.stdout_text().lines().find_map(|l| l.strip_prefix("CA ").and_then(|h| h.parse().ok()))
            })
            .await;
        let token = std::fs::read_to_string(dir.join("state/admin.token")).expect("admin token").trim().to_string();
        let admin = crate::admin::AdminClient::new(format!("http://127.0.0.1:{admin_port}"), token);
        CoordinatorProc { proc, quic_addr: ([127, 0, 0, 1], quic_port).into(), ca_hash, admin }
    }
}

/// Starts `hexa-agent` as a process that enrolls with `token` (if not enrolled yet).
pub fn spawn_agent(dir: &Path, name: &str, coordinator: std::net::SocketAddr, token: &str, ca: &str) -> Proc {
    spawn_agent_to(dir, name, &coordinator.to_string(), token, ca)
}

/// [`spawn_agent`] with the agent's `coordinator` setting as given (several addresses, say).
pub fn spawn_agent_to(dir: &Path, name: &str, coordinators: &str, token: &str, ca: &str) -> Proc {
    Proc::spawn(
        &crate::bin("hexa-agent"),
        &[
            "--coordinator".into(),
            coordinators.to_string(),
            "--token".into(),
            token.into(),
            "--ca-hash".into(),
            ca.into(),
            "--state-dir".into(),
            dir.join(name).display().to_string(),
            "--node-name".into(),
            name.into(),
        ],
        dir.join(format!("{name}.log")),
    )
}

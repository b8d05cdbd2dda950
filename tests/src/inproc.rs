//! Coordinator and agents running inside the test process.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use hexa_agent::config::AgentConfig;
use hexa_coordinator::config::CoordinatorConfig;

use crate::admin::AdminClient;

/// Fast thresholds so health tests take seconds: reports every 300ms, Unreachable after 1s, Lost
/// after 3s.
pub fn fast_config(state_dir: PathBuf) -> CoordinatorConfig {
    CoordinatorConfig {
        state_dir,
        quic_listen: "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!()),
        admin_listen: "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!()),
        report_interval: Duration::from_millis(300),
        unreachable_after: Duration::from_secs(1),
        lost_after: Duration::from_secs(3),
        // Tests that exercise K3s turn it on with a local artifact server.
        k3s: hexa_coordinator::config::K3sSettings { manage: false, ..Default::default() },
        // Isolation specs go to agents only in the tests about them.
        isolation: hexa_coordinator::config::IsolationSettings { enabled: false, ..Default::default() },
        // Likewise the host cluster: tests that need one start a fake API server.
        hostcluster: hexa_coordinator::hostcluster::render::RenderSettings {
            mode: hexa_coordinator::hostcluster::render::Mode::Off,
            ..Default::default()
        },
        ..CoordinatorConfig::default()
    }
}

#[derive(Debug)]
pub struct Coordinator {
    pub running: hexa_coordinator::Running,
    pub admin: AdminClient,
    pub dir: tempfile::TempDir,
}

impl Coordinator {
    pub async fn start() -> Coordinator {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_with(fast_config(dir.path().join("coordinator")), dir).await
    }

    /// Starts with the fast config after `tune` has adjusted it.
    pub async fn start_tuned(tune: impl FnOnce(&mut CoordinatorConfig)) -> Coordinator {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = fast_config(dir.path().join("coordinator"));
        tune(&mut config);
        Self::start_with(config, dir).await
    }

    pub async fn start_with(config: CoordinatorConfig, dir: tempfile::TempDir) -> Coordinator {
        crate::init();
        let running = hexa_coordinator::start(config).await.expect("coordinator starts");
        let token = std::fs::read_to_string(&running.admin_token_path).expect("admin token").trim().to_string();
        let admin = AdminClient::new(format!("http://{}", running.admin_addr), token);
        Coordinator { running, admin, dir }
    }

    /// Config for an agent that enrolls here with `token` and keeps its state under this tempdir.
    pub fn agent_config(&self, name: &str, token: &str) -> AgentConfig {
        AgentConfig {
            coordinator: self.running.quic_addr.to_string(),
            token: token.to_string(),
            ca_hash: self.running.ca_hash.to_string(),
            state_dir: self.dir.path().join("agents").join(name),
            node_name: name.to_string(),
            ephemeral_path: self.dir.path().to_path_buf(),
            ..AgentConfig::default()
        }
    }

    /// Mints a shared-pool token and starts an agent with it.
    pub async fn spawn_agent(&self, name: &str) -> Agent {
        let token = self.admin.token("shared", "10m").await;
        Agent::spawn(self.agent_config(name, &token))
    }
}

/// A host for an in-process agent: the real /proc and cgroups, but K3s goes under a directory
/// beside the agent's state and systemd is a recording fake, so no test touches the machine's
/// services.
pub fn test_host(config: &AgentConfig) -> hexa_agent::Host {
    let root = config.state_dir.with_extension("root");
    hexa_agent::Host {
        readiness: std::sync::Arc::new(hexa_agent::k3s::KubectlReadiness::under(&root)),
        root,
        systemd: std::sync::Arc::new(hexa_agent::k3s::RecordingSystemd::new()),
        // The machine's firewall is left alone; firewall tests use network namespaces.
        firewall: std::sync::Arc::new(hexa_agent::isolation::firewall::MemoryFirewall::new()),
        pods: std::sync::Arc::new(hexa_agent::pods::StaticPodSource::default()),
        // The machine's own pods are not this node's.
        local_pods: std::sync::Arc::new(hexa_agent::isolation::local_pods::CniResults::new(
            config.state_dir.with_extension("cni"),
            &config.isolation.pod_bridge,
        )),
        ..hexa_agent::Host::default()
    }
}

#[derive(Debug)]
pub struct Agent {
    pub config: AgentConfig,
    stop: watch::Sender<bool>,
    pub task: JoinHandle<Result<(), hexa_agent::AgentError>>,
}

impl Agent {
    pub fn spawn(config: AgentConfig) -> Agent {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(hexa_agent::run(config.clone(), test_host(&config), stopped));
        Agent { config, stop, task }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

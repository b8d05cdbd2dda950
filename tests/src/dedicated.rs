//! The dedicated plan end to end: a coordinator with `[proxmox]` pointing at the emulator, the
//! fake Kubernetes API server as host cluster, and VMs that boot into real agents.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use hexa_coordinator::config::CoordinatorConfig;
use hexa_coordinator::hostcluster::render::Mode;
use hexa_coordinator::proxmox::ProxmoxSettings;
use hexa_coordinator::proxmox::settings::Template;
use hexa_shared::tenant::Tenant;

use crate::fake_kube::FakeKube;
use crate::inproc::Coordinator;
use crate::pve::boot::{self, BootLog};
use crate::pve::{Pve, TOKEN, Timings};

/// Templates of the emulator: one per default node class.
pub const TEMPLATES: [(u32, &str); 3] = [(9000, "tpl-s"), (9001, "tpl-m"), (9002, "tpl-l")];

/// `[proxmox]` for the emulator, pinning its certificate by fingerprint.
pub fn settings(pve: &Pve, dir: &Path, quic_port: u16) -> ProxmoxSettings {
    let token_file = dir.join("proxmox.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token file");
    let templates = ["S", "M", "L"]
        .iter()
        .zip(TEMPLATES)
        .map(|(class, (vmid, _))| (class.to_string(), Template { node: "pve1".into(), vmid, disk: "scsi0".into() }))
        .collect();
    ProxmoxSettings {
        endpoint: pve.endpoint(),
        token_file,
        fingerprint: pve.fingerprint.clone(),
        templates,
        seed_listen: "127.0.0.1:0".parse().expect("address"),
        coordinator_address: format!("127.0.0.1:{quic_port}"),
        task_timeout: Duration::from_secs(30),
        registration_timeout: Duration::from_secs(20),
        shutdown_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(3),
        task_poll: Duration::from_millis(50),
        retry_for: Duration::from_secs(90),
        ..ProxmoxSettings::default()
    }
}

/// A dedicated-plan world.
#[derive(Debug)]
pub struct Env {
    pub pve: Pve,
    pub kube: Arc<FakeKube>,
    pub c: Coordinator,
    pub boots: BootLog,
    pub dir: tempfile::TempDir,
}

/// Points `pve`'s VMs at cloud-init boots under `dir` whose nodes register with `kube`.
pub fn boot_into_agents(pve: &Pve, dir: &Path, kube: Arc<FakeKube>) -> BootLog {
    let log = BootLog::default();
    let on_agent: boot::OnAgent = Arc::new(move |name: &str| {
        // The kubelet registers its Node; the fake stands in for it.
        let _ = kube.add_node(name, &[("kubernetes.io/hostname", name)]);
    });
    pve.set_boot(boot::cloud_init(dir.join("vms"), log.clone(), Some(on_agent)));
    log
}

/// The coordinator config for `settings` on the fake API server.
pub fn coordinator_config(kube: &FakeKube, dir: &Path, quic_port: u16, settings: ProxmoxSettings) -> CoordinatorConfig {
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, kube.kubeconfig_yaml()).expect("kubeconfig");
    let mut config = crate::inproc::fast_config(dir.join("coordinator"));
    config.quic_listen = ([127, 0, 0, 1], quic_port).into();
    config.hostcluster.mode = Mode::Apply;
    config.hostcluster.kubeconfig = kubeconfig.display().to_string();
    config.proxmox = Some(settings);
    config
}

impl Env {
    pub async fn start(timings: Timings, tune: impl FnOnce(&mut ProxmoxSettings)) -> Env {
        crate::init();
        let pve = Pve::start(timings, &TEMPLATES).await;
        Env::start_on(pve, tune).await
    }

    /// A coordinator on an emulator already started (and perhaps holding VMs).
    pub async fn start_on(pve: Pve, tune: impl FnOnce(&mut ProxmoxSettings)) -> Env {
        Env::start_configured(pve, |config| {
            if let Some(settings) = config.proxmox.as_mut() {
                tune(settings);
            }
        })
        .await
    }

    /// A coordinator on `pve` whose whole config `tune` may change.
    pub async fn start_configured(pve: Pve, tune: impl FnOnce(&mut CoordinatorConfig)) -> Env {
        crate::init();
        let dir = tempfile::tempdir().expect("tempdir");
        let kube = Arc::new(FakeKube::start().await);
        let boots = boot_into_agents(&pve, dir.path(), kube.clone());
        let quic_port = crate::free_port();
        let settings = settings(&pve, dir.path(), quic_port);
        let mut config = coordinator_config(&kube, dir.path(), quic_port, settings);
        tune(&mut config);
        let state = tempfile::tempdir().expect("tempdir");
        let c = Coordinator::start_with(config, state).await;
        Env { pve, kube, c, boots, dir }
    }

    pub async fn create(&self, name: &str, plan: Value) -> Tenant {
        let (status, body) =
            self.c.admin.request(Method::POST, "/v1/tenants", Some(json!({"name": name, "plan": plan}))).await;
        assert_eq!(status, 201, "{body}");
        serde_json::from_value(body).expect("tenant")
    }

    pub async fn set_plan(&self, name: &str, plan: Value) -> Tenant {
        let (status, body) =
            self.c.admin.request(Method::PATCH, &format!("/v1/tenants/{name}"), Some(json!({"plan": plan}))).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_value(body).expect("tenant")
    }

    pub async fn tenant(&self, name: &str) -> Option<Tenant> {
        let (status, body) = self.c.admin.request(Method::GET, &format!("/v1/tenants/{name}"), None).await;
        (status == 200).then(|| serde_json::from_value(body).expect("tenant"))
    }

    pub async fn provisioning(&self) -> Value {
        self.c.admin.request(Method::GET, "/v1/provisioning", None).await.1
    }

    /// Waits until `tenant` has `count` dedicated nodes bound.
    pub async fn bound(&self, tenant: &str, count: usize, within: Duration) -> Tenant {
        crate::eventually(within, &format!("{count} dedicated nodes bound to {tenant}"), async || {
            self.tenant(tenant)
                .await
                .filter(|t| t.placement.dedicated_nodes.len() == count && t.placement.awaiting_nodes == 0)
        })
        .await
    }

    /// Completes the tenant's vCluster install on the fake API server and waits for Ready.
    pub async fn make_ready(&self, tenant: &str, within: Duration) -> Tenant {
        let job = format!("helm-install-vcluster-{tenant}");
        crate::eventually(within, "HelmChart install Job", async || self.kube.object("jobs", "kube-system", &job))
            .await;
        self.kube.complete_job("kube-system", &job).expect("complete job");
        crate::eventually(within, "vCluster StatefulSet", async || {
            self.kube.make_statefulset_ready(&format!("hx-{tenant}"), &format!("vcluster-{tenant}")).ok()
        })
        .await;
        crate::eventually(within, "tenant Ready", async || {
            self.tenant(tenant).await.filter(|t| t.phase == hexa_shared::tenant::Phase::Ready)
        })
        .await
    }

    /// Waits until the emulator holds exactly `count` VMs and the coordinator no VM record,
    /// token or node beyond those.
    pub async fn settled(&self, count: usize, within: Duration) {
        crate::eventually(within, &format!("exactly {count} VMs and nothing else"), async || {
            let vms: Vec<_> = self.pve.vms().into_iter().filter(|v| v.name.starts_with("hx-")).collect();
            let records = self.c.running.provisioner.as_ref()?.records().ok()?;
            let nodes = self.c.admin.nodes().await;
            let vm_nodes = nodes.iter().filter(|n| n.provider != hexa_shared::proto::ProviderIdentity::None).count();
            let bound = records.iter().filter(|r| r.state == hexa_coordinator::proxmox::VmState::Bound).count();
            let (_, tokens) = self.c.admin.request(Method::GET, "/v1/tokens", None).await;
            let vm_tokens = tokens
                .as_array()?
                .iter()
                .filter(|t| t["pool"].as_str().is_some_and(|p| p.starts_with("dedicated:")))
                .count();
            (vms.len() == count && records.len() == count && bound == count && vm_nodes == count && vm_tokens == count)
                .then_some(())
        })
        .await;
    }

    /// Every `last_error` `/v1/provisioning` shows, polled until `done` says so.
    pub async fn errors_until(&self, within: Duration, mut done: impl AsyncFnMut(&Env) -> bool) -> Vec<String> {
        let deadline = std::time::Instant::now() + within;
        let mut seen: Vec<String> = Vec::new();
        loop {
            for row in self.provisioning().await.as_array().cloned().unwrap_or_default() {
                for vm in row["vms"].as_array().cloned().unwrap_or_default() {
                    if let Some(e) = vm["last_error"].as_str() {
                        if !seen.iter().any(|s| s == e) {
                            seen.push(e.to_string());
                        }
                    }
                }
            }
            if done(self).await {
                return seen;
            }
            assert!(std::time::Instant::now() < deadline, "timed out; errors seen: {seen:?}");
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    }

    /// Every answer the admin API gave in this world is one its OpenAPI document describes
    /// (including `/v1/provisioning` with VMs in it).
    pub fn assert_contract(&self) {
        let contract = crate::admin::Contract::new(hexa_coordinator::admin::openapi_document());
        let exchanges = self.c.admin.exchanges();
        assert!(!exchanges.is_empty(), "no admin API answer to check");
        let failures: Vec<String> = exchanges.iter().filter_map(|e| contract.check(e).err()).collect();
        assert!(failures.is_empty(), "answers the OpenAPI document does not describe: {failures:#?}");
    }

    /// Checks the contract, then stops every VM and the coordinator.
    pub async fn stop(self) {
        self.assert_contract();
        self.pve.shutdown_vms().await;
        self.c.running.shutdown().await;
    }
}

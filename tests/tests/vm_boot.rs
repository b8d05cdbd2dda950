//! A real boot: the provisioner clones the template `scripts/vm-image` built and starts it in the
//! Proxmox VE emulator, which runs it under qemu with the `smbios1` the provisioner set; the
//! guest's cloud-init fetches the NoCloud seed from its SMBIOS serial, installs the agent's `.deb`
//! the coordinator serves, writes the agent's config and enables the service; the agent starts
//! under the guest's systemd and enrolls with the VM's SMBIOS identity; the node is bound to its
//! dedicated tenant. Inside the VM (through the QEMU guest agent) the unit, its slice and cgroup v2
//! are checked, and the cgroup governor's scenarios (`tests/tests/cgroup_governor.rs`, whose
//! `*_on_v2` half needs a cgroup v2 host) run on the guest's real unified hierarchy. Then the VM is
//! destroyed through the provisioner and nothing is left.
//!
//! qemu, the emulator, the fake Kubernetes API server and the coordinator all run inside a network
//! namespace of the test's own, whose loopback the guest sees at 10.0.2.2: the VM reaches nothing
//! else. Needs root, qemu and mmdebstrap (CI has them: scripts/test installs them and builds the
//! package and the image first); without them the test says so by name and does nothing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hexa_coordinator::inventory::{ProviderKind, ProviderView};
use hexa_coordinator::proxmox::settings::Template;
use hexa_shared::proto::ProviderIdentity;
use hexa_shared::tenant::NodeClass;
use hexa_tests::dedicated::Env;
use hexa_tests::netns::Isolated;
use hexa_tests::pve::boot::{parse_serial, parse_smbios1};
use hexa_tests::pve::qemu::{self, Guests, HOST_FROM_GUEST};
use hexa_tests::pve::{Pve, Timings};
use reqwest::Method;
use serde_json::{Value, json};

const TEST: &str = "a_vm_boots_from_its_seed_installs_the_package_and_becomes_its_tenants_node";
const TEMPLATE: u32 = 9000;
/// Generous bounds for a TCG guest on a shared machine; none of them is a timing assertion.
const BOOT_WITHIN: Duration = Duration::from_secs(900);
const STEP_WITHIN: Duration = Duration::from_secs(180);

/// Prints the VMs' serial consoles and qemu's own messages when the test fails.
struct Consoles(PathBuf);

impl Drop for Consoles {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let Ok(entries) = std::fs::read_dir(&self.0) else { return };
        for entry in entries.flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(150)..].join("\n");
            eprintln!("===== {} (last 150 lines) =====\n{tail}", entry.path().display());
        }
    }
}

#[test]
fn a_vm_boots_from_its_seed_installs_the_package_and_becomes_its_tenants_node() {
    if let Some(why) = qemu::unavailable() {
        eprintln!("{TEST}: skipped: {why}");
        return;
    }
    hexa_tests::init();
    let building = Instant::now();
    let image = qemu::image().unwrap_or_else(|e| panic!("the VM image: {e}"));
    eprintln!("figure: VM image ready in {:.1} s ({})", building.elapsed().as_secs_f64(), image.root.display());
    let deb = qemu::agent_deb().unwrap_or_else(|e| panic!("the agent package: {e}"));
    let namespace = Isolated::new("vm").expect("network namespace");
    namespace
        .run(move || {
            let runtime =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
            runtime.block_on(scenario(image, deb));
        })
        .expect("inside the namespace");
}

/// The guest's view of a URL the test process reaches on the namespace's loopback, and back.
fn from_test(url: &str) -> String {
    url.replace(HOST_FROM_GUEST, "127.0.0.1")
}

fn labels(node: &Value) -> serde_json::Map<String, Value> {
    node["metadata"]["labels"].as_object().cloned().unwrap_or_default()
}

fn tainted_for(node: &Value, tenant: &str) -> bool {
    node["spec"]["taints"].as_array().is_some_and(|t| {
        t.iter().any(|t| t["key"] == "hexabase.ai/dedicated" && t["value"] == tenant && t["effect"] == "NoSchedule")
    })
}

/// Runs `script` in the guest and fails the test unless it exits 0; its stdout.
async fn guest(agent: &Path, script: &str) -> String {
    let out = qemu::exec(agent, script, STEP_WITHIN).await.unwrap_or_else(|e| panic!("in the guest: {e}"));
    assert_eq!(out.code, 0, "`{script}` in the guest: {}{}", out.stdout, out.stderr);
    out.stdout
}

/// `systemctl show` of the agent's unit, as a map.
async fn agent_unit(agent: &Path) -> std::collections::BTreeMap<String, String> {
    let show = guest(
        agent,
        "systemctl show hexa-agent.service -p ActiveState -p SubState -p Type -p WatchdogUSec -p MainPID \
         -p ControlGroup -p NRestarts",
    )
    .await;
    show.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The governor's cgroup v2 scenarios run in the guest. Its cpu-split scenario is left out: its
/// "light" pod (3 ms of work every 10 ms, by the wall clock) presses against the 0.3 CPU cap as
/// hard as the busy one on an emulated CPU, so which pod is busier is not what it assumes.
const GOVERNOR_SCENARIOS: [&str; 3] = [
    "the_tenant_over_its_memory_share_is_oom_killed_and_the_other_is_not_on_v2",
    "a_fork_bomb_stops_at_the_pids_cap_on_v2",
    "a_tenant_s_pods_are_held_to_its_share_together_on_v2",
];

/// The governor's test binary from this checkout's build (`cargo test` builds it beside this one).
fn governor_test_binary() -> PathBuf {
    // This test runs from target/<profile>/deps, where cargo puts every test binary.
    let deps = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)).unwrap_or_default();
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&deps)
        .unwrap_or_else(|e| panic!("{}: {e}", deps.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            name.starts_with("cgroup_governor-") && p.extension().is_none()
        })
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).unwrap_or_else(|| {
        panic!(
            "no cgroup_governor test binary in {}: build it with `cargo test -p hexa-tests --test cgroup_governor \
             --test vm_boot`",
            deps.display()
        )
    })
}

/// Serves the governor's test binary on the namespace's loopback, runs its cgroup v2 scenarios in
/// the guest, and returns what they printed.
async fn governor_tests_in(agent: &Path) -> String {
    let binary = governor_test_binary();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("listener");
    let port = listener.local_addr().expect("address").port();
    let router = axum::Router::new().route(
        "/cgroup_governor",
        axum::routing::get(move || {
            let binary = binary.clone();
            async move { tokio::fs::read(&binary).await.unwrap_or_default() }
        }),
    );
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    let script = format!(
        "curl -fsS -o /root/cgroup_governor http://{HOST_FROM_GUEST}:{port}/cgroup_governor && \
         chmod 0755 /root/cgroup_governor && /root/cgroup_governor --exact --test-threads=1 {} 2>&1",
        GOVERNOR_SCENARIOS.join(" ")
    );
    let out =
        qemu::exec(agent, &script, Duration::from_secs(900)).await.unwrap_or_else(|e| panic!("in the guest: {e}"));
    server.abort();
    assert_eq!(out.code, 0, "the governor's cgroup v2 scenarios in the guest:\n{}{}", out.stdout, out.stderr);
    eprintln!("in the guest: {}", out.stdout.lines().filter(|l| l.starts_with("test ")).collect::<Vec<_>>().join("; "));
    out.stdout
}

async fn scenario(image: qemu::Image, deb: PathBuf) {
    let logs = tempfile::tempdir().expect("tempdir");
    let _consoles = Consoles(logs.path().to_path_buf());
    let pve = Pve::start(Timings::fast(), &[(TEMPLATE, "tpl-debian12")]).await;
    let seed_port = hexa_tests::free_port();
    let deb_for_config = deb.clone();
    let env = Env::start_configured(pve, move |config| {
        // A class a TCG guest on two cores boots in reasonable time.
        config.placement.node_classes =
            vec![NodeClass { name: "T".into(), cpu_millis: 2000, memory_bytes: 2 << 30, disk_bytes: 16 << 30 }];
        let quic_port = config.quic_listen.port();
        let proxmox = config.proxmox.as_mut().expect("[proxmox]");
        proxmox.templates =
            [("T".to_string(), Template { node: "pve1".into(), vmid: TEMPLATE, disk: "scsi0".into() })].into();
        proxmox.seed_listen = ([127, 0, 0, 1], seed_port).into();
        proxmox.seed_url = format!("http://{HOST_FROM_GUEST}:{seed_port}");
        proxmox.coordinator_address = format!("{HOST_FROM_GUEST}:{quic_port}");
        proxmox.agent_deb = deb_for_config;
        proxmox.registration_timeout = BOOT_WITHIN;
    })
    .await;
    let guests = Guests::default();
    env.pve.set_boot(qemu::qemu_boot(image, logs.path().to_path_buf(), guests.clone()));

    let requested = Instant::now();
    let (status, body) = env
        .c
        .admin
        .request(
            Method::POST,
            "/v1/tenants",
            Some(json!({"name": "island", "plan": {"kind": "dedicated", "node_class": "T", "count": 1}})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let vm = hexa_tests::eventually(STEP_WITHIN, "the VM powered on under qemu", async || guests.all().pop()).await;
    let powered_on = vm.started;
    eprintln!("figure: tenant request to VM power-on {:.1} s", powered_on.duration_since(requested).as_secs_f64());

    // The node enrolls; the kubelet's Node registration is the fake API server's to stand in for.
    let node_name = hexa_tests::eventually(BOOT_WITHIN, "the VM's agent enrolled", async || {
        let nodes = env.c.admin.nodes().await;
        let node = nodes.into_iter().find(|n| n.provider.kind == ProviderKind::Proxmox)?;
        Some(node.name)
    })
    .await;
    let enrolled = powered_on.elapsed();
    env.kube.add_node(&node_name, &[("kubernetes.io/hostname", node_name.as_str())]).expect("Node registered");
    let tenant = env.bound("island", 1, STEP_WITHIN).await;
    let bound = powered_on.elapsed();
    eprintln!(
        "figure: VM power-on to agent enrolled {:.1} s, to node bound to its tenant {:.1} s",
        enrolled.as_secs_f64(),
        bound.as_secs_f64()
    );

    // The node is the VM: it enrolled with the VM's VMID and SMBIOS uuid, and is the tenant's.
    let pve_vm = env.pve.vms().into_iter().find(|v| v.vmid == vm.vmid).expect("the VM in the emulator");
    let smbios = parse_smbios1(&pve_vm.config["smbios1"]);
    let uuid = smbios["uuid"].clone();
    let nodes = env.c.admin.nodes().await;
    let node = nodes.iter().find(|n| n.name == node_name).expect("the node");
    assert_eq!(
        node.provider,
        ProviderView::from(&ProviderIdentity::Proxmox { vmid: vm.vmid, smbios_uuid: uuid.clone() })
    );
    assert_eq!(tenant.placement.dedicated_nodes, vec![node_name.clone()]);
    assert_eq!(node.pool.to_string(), "dedicated:island");
    assert_eq!(node.node_class.as_deref(), Some("T"));
    // Labelled and tainted for the tenant on the host cluster.
    hexa_tests::eventually(STEP_WITHIN, "node labelled and tainted", async || {
        env.kube
            .object("nodes", "", &node_name)
            .filter(|o| {
                labels(o).get("tenant.hexabase.ai/island") == Some(&json!("true"))
                    && labels(o).get("hexabase.ai/pool") == Some(&json!("dedicated"))
                    && tainted_for(o, "island")
            })
            .map(|_| ())
    })
    .await;
    // The seed is withdrawn and the token used.
    let seed = parse_serial(&smbios["serial"])["s"].clone();
    assert!(seed.starts_with(&format!("http://{HOST_FROM_GUEST}:{seed_port}/seed/")), "{seed}");
    let status = reqwest::get(format!("{}user-data", from_test(&seed))).await.expect("seed server").status();
    assert_eq!(status, 404, "the seed of a bound VM is still served");
    let (_, tokens) = env.c.admin.request(Method::GET, "/v1/tokens", None).await;
    let tokens = tokens.as_array().cloned().unwrap_or_default();
    assert!(!tokens.is_empty() && tokens.iter().all(|t| t["status"] == "used"), "{tokens:?}");

    // Inside the VM, through its guest agent.
    qemu::wait_for_agent(&vm.agent, STEP_WITHIN).await.unwrap_or_else(|e| panic!("{e}"));
    let status = guest(&vm.agent, "cloud-init status --long").await;
    assert!(status.contains("status: done") && status.contains("NoCloud"), "{status}");
    let product_uuid = guest(&vm.agent, "cat /sys/class/dmi/id/product_uuid").await;
    assert_eq!(product_uuid.trim().to_ascii_lowercase(), uuid.to_ascii_lowercase());
    // The package built from this checkout, installed from the coordinator.
    let version = deb
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("hexa-agent_"))
        .and_then(|n| n.split('_').next())
        .expect("version in the package's file name")
        .to_string();
    let installed = guest(&vm.agent, "dpkg-query -W -f '${Status} ${Version}' hexa-agent").await;
    assert_eq!(installed, format!("install ok installed {version}"));
    // cgroup v2 and systemd: the agent runs as a notify service with its watchdog, in its slice.
    assert_eq!(guest(&vm.agent, "stat -fc %T /sys/fs/cgroup").await.trim(), "cgroup2fs");
    let unit = agent_unit(&vm.agent).await;
    assert_eq!(unit.get("ActiveState").map(String::as_str), Some("active"), "{unit:?}");
    assert_eq!(unit.get("SubState").map(String::as_str), Some("running"), "{unit:?}");
    assert_eq!(unit.get("Type").map(String::as_str), Some("notify"), "{unit:?}");
    assert_eq!(unit.get("WatchdogUSec").map(String::as_str), Some("1min"), "{unit:?}");
    assert_eq!(unit.get("ControlGroup").map(String::as_str), Some("/hexabase.slice/hexa-agent.service"), "{unit:?}");
    let pid = unit.get("MainPID").cloned().unwrap_or_default();
    let rss = guest(&vm.agent, &format!("sed -n 's/^VmRSS:[[:space:]]*//p' /proc/{pid}/status")).await;
    let service_memory = guest(&vm.agent, "cat /sys/fs/cgroup/hexabase.slice/hexa-agent.service/memory.current").await;
    eprintln!(
        "figure: hexa-agent under systemd in the VM: VmRSS {}, service cgroup memory.current {} bytes",
        rss.trim(),
        service_memory.trim()
    );
    // The guest reaches the namespace's loopback and nothing beyond it.
    let outside = qemu::exec(&vm.agent, "curl -sS -m 5 -o /dev/null http://deb.debian.org/", STEP_WITHIN)
        .await
        .expect("in the guest");
    assert_ne!(outside.code, 0, "the VM reached the Debian mirror: {outside:?}");

    // The cgroup governor on the VM's real cgroup v2, beside the agent under systemd: the
    // governor's end-to-end scenarios (a fake kubelet tree of pod cgroups with real processes,
    // tests/tests/cgroup_governor.rs), which skip on this cgroup v1 host, run in the guest.
    let governed = governor_tests_in(&vm.agent).await;
    for scenario in GOVERNOR_SCENARIOS {
        assert!(governed.contains(&format!("test {scenario} ... ok")), "{scenario} not ok in the guest:\n{governed}");
    }
    assert!(!governed.contains("skipping"), "a governor scenario skipped in the guest:\n{governed}");
    let unit = agent_unit(&vm.agent).await;
    assert_eq!(unit.get("ActiveState").map(String::as_str), Some("active"), "{unit:?}");
    assert_eq!(unit.get("NRestarts").map(String::as_str), Some("0"), "{unit:?}");

    // Destroyed through the provisioner: the tenant goes, its VM is destroyed, nothing is left.
    let (status, body) = env.c.admin.request(Method::DELETE, "/v1/tenants/island", None).await;
    assert_eq!(status, 200, "{body}");
    env.settled(0, STEP_WITHIN).await;
    assert!(env.c.admin.nodes().await.iter().all(|n| n.name != node_name), "the node is still in the inventory");
    assert_eq!(env.provisioning().await, json!([]));
    hexa_tests::eventually(STEP_WITHIN, "qemu gone and its disk removed", async || {
        (guests.all().is_empty()
            && !Path::new(&format!("/proc/{}", vm.pid)).exists()
            && !vm.overlay.exists()
            && !vm.agent.exists())
        .then_some(())
    })
    .await;
    env.stop().await;
}

//! The dedicated plan on Proxmox VMs: the coordinator clones, configures and starts VMs in the
//! Proxmox VE emulator, the VMs boot like cloud-init into real agents that enroll with their
//! Proxmox identity, and the nodes are bound to their tenant on the fake Kubernetes API server.

use std::time::Duration;

use hexa_shared::proto::ProviderIdentity;
use hexa_tests::dedicated::Env;
use hexa_tests::eventually;
use hexa_tests::pve::Timings;
use hexa_tests::pve::boot::{parse_serial, parse_smbios1};
use serde_json::{Value, json};

fn dedicated(class: &str, count: u32) -> Value {
    json!({"kind": "dedicated", "node_class": class, "count": count})
}

fn labels(node: &Value) -> serde_json::Map<String, Value> {
    node["metadata"]["labels"].as_object().cloned().unwrap_or_default()
}

fn tainted_for(node: &Value, tenant: &str) -> bool {
    node["spec"]["taints"].as_array().is_some_and(|t| {
        t.iter().any(|t| t["key"] == "hexabase.ai/dedicated" && t["value"] == tenant && t["effect"] == "NoSchedule")
    })
}

/// The seed URL a VM was given, from its `smbios1`.
fn seed_url(vm: &hexa_tests::pve::Vm) -> String {
    let fields = parse_smbios1(vm.config.get("smbios1").map(String::as_str).unwrap_or(""));
    parse_serial(&fields["serial"])["s"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedicated_tenant_gets_two_vms_that_enroll_with_their_identity_and_become_its_nodes() {
    let env = Env::start(Timings::fast(), |_| {}).await;
    env.create("acme", dedicated("S", 2)).await;
    let tenant = env.bound("acme", 2, Duration::from_secs(60)).await;

    // Two VMs, cloned from the S template, configured as the class says, running, tagged.
    let vms = env.pve.vms();
    assert_eq!(vms.len(), 2, "{vms:?}");
    let clones = env.pve.clones();
    assert_eq!(clones.len(), 2, "nothing cloned twice: {clones:?}");
    let nodes = env.c.admin.nodes().await;
    for vm in &vms {
        assert!(vm.running && vm.lock.is_none(), "{vm:?}");
        assert_eq!((vm.config["cores"].as_str(), vm.config["memory"].as_str()), ("4", "16384"), "{vm:?}");
        assert_eq!(vm.disk_gib, 200);
        assert_eq!(vm.config["onboot"], "1");
        let tags = &vm.config["tags"];
        assert!(tags.contains("hexabase") && tags.contains("hx-tenant-acme") && tags.contains("hx-rec-"), "{tags}");
        // The node that enrolled presented this VM's identity, and is the tenant's.
        let uuid = parse_smbios1(&vm.config["smbios1"])["uuid"].clone();
        let node = nodes
            .iter()
            .find(|n| n.provider == ProviderIdentity::Proxmox { vmid: vm.vmid, smbios_uuid: uuid.clone() })
            .unwrap_or_else(|| panic!("no node with VM {}'s identity in {nodes:?}", vm.vmid));
        assert!(tenant.placement.dedicated_nodes.contains(&node.name), "{tenant:?}");
        assert_eq!(node.node_class.as_deref(), Some("S"));
        assert_eq!(node.pool.to_string(), "dedicated:acme");
        // Its seed is no longer served.
        let seed = seed_url(vm);
        let status = reqwest::get(format!("{seed}user-data")).await.unwrap().status();
        assert_eq!(status, 404, "seed of a bound VM still served");
    }
    // Both nodes labelled and tainted for the tenant on the host cluster.
    eventually(Duration::from_secs(20), "nodes labelled and tainted", async || {
        tenant
            .placement
            .dedicated_nodes
            .iter()
            .all(|n| {
                env.kube.object("nodes", "", n).is_some_and(|o| {
                    labels(&o).get("tenant.hexabase.ai/acme") == Some(&json!("true"))
                        && labels(&o).get("hexabase.ai/pool") == Some(&json!("dedicated"))
                        && tainted_for(&o, "acme")
                })
            })
            .then_some(())
    })
    .await;
    env.make_ready("acme", Duration::from_secs(20)).await;
    assert_eq!(env.provisioning().await, json!([]));
    // Every node's tokens are used: none of the VMs' tokens is left usable.
    let (_, tokens) = env.c.admin.request(reqwest::Method::GET, "/v1/tokens", None).await;
    assert!(tokens.as_array().unwrap().iter().all(|t| t["status"] == "used"), "{tokens}");
    env.stop().await;
}

/// Enrolls from outside any VM with `token`, presenting `provider`.
async fn enroll_as(
    env: &Env,
    token: &str,
    name: &str,
    provider: ProviderIdentity,
) -> Result<String, hexa_agent::AgentError> {
    let dir = tempfile::tempdir().unwrap();
    let state = hexa_agent::state::StateDir::open(dir.path()).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let facts = hexa_agent::enroll::NodeFacts {
        hostname: "intruder".into(),
        machine_id: "m".into(),
        requested_name: Some(name.to_string()),
        provider,
    };
    let enrolled =
        hexa_agent::enroll::enroll(&endpoint, env.c.running.quic_addr, token, env.c.running.ca_hash, &facts, &state)
            .await;
    enrolled.map(|e| e.node_name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_and_its_token_serve_one_vm_once() {
    let env = Env::start(Timings::fast(), |_| {}).await;
    // The VM starts but its image never runs cloud-init: its seed waits, unused.
    env.pve.inject(hexa_tests::pve::Fault::NeverBoot { count: 1 });
    env.create("solo", dedicated("S", 1)).await;
    eventually(Duration::from_secs(30), "VM waiting for registration", async || {
        let rows = env.provisioning().await;
        (rows[0]["vms"][0]["state"] == "waiting_for_registration").then_some(())
    })
    .await;
    let vm = env.pve.vms().pop().unwrap();
    let uuid = parse_smbios1(&vm.config["smbios1"])["uuid"].clone();
    let seed = seed_url(&vm);
    // `hexactl provisioning` shows the VM with its state, Proxmox node and VMID.
    let out = std::process::Command::new(hexa_tests::bin("hexactl"))
        .arg("provisioning")
        .env("HEXA_SERVER", &env.c.admin.base)
        .env("HEXA_TOKEN", &env.c.admin.token)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let row = table.lines().find(|l| l.contains(&vm.name.trim_start_matches("hx-").to_string())).unwrap_or("");
    assert!(
        row.contains("waiting_for_registration") && row.contains(&vm.node) && row.contains(&vm.vmid.to_string()),
        "{table}"
    );
    let get = async |file: &str| {
        let response = reqwest::get(format!("{seed}{file}")).await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    };
    let (status, meta) = get("meta-data").await;
    assert_eq!(status, 200);
    assert!(meta.contains(&format!("instance-id: {uuid}")) && meta.contains("dsmode: net"), "{meta}");
    assert_eq!(get("vendor-data").await, (200, "#cloud-config\n{}\n".to_string()));
    let (status, user_data) = get("user-data").await;
    assert_eq!(status, 200);
    // The user-data as served passes the real schema check.
    if std::process::Command::new("cloud-init").arg("--version").output().is_ok() {
        let file = env.dir.path().join("served-user-data");
        std::fs::write(&file, &user_data).unwrap();
        let out =
            std::process::Command::new("cloud-init").args(["schema", "--config-file"]).arg(&file).output().unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!(
            "a_seed_and_its_token_serve_one_vm_once: cloud-init schema check skipped: `cloud-init` is not installed"
        );
    }
    let token = user_data
        .lines()
        .find_map(|l| l.trim().strip_prefix("token = \""))
        .map(|t| t.trim_end_matches('"').to_string())
        .expect("token in agent.toml");
    assert!(user_data.contains(&format!("proxmox_vmid = {}", vm.vmid)), "{user_data}");

    // Another VM's identity, or none: refused, and the token stays usable.
    let other = ProviderIdentity::Proxmox { vmid: vm.vmid + 1, smbios_uuid: uuid.clone() };
    let refused = enroll_as(&env, &token, &vm.name, other).await.unwrap_err().to_string();
    assert!(refused.contains("IdentityMismatch"), "{refused}");
    let refused = enroll_as(&env, &token, &vm.name, ProviderIdentity::None).await.unwrap_err().to_string();
    assert!(refused.contains("IdentityMismatch"), "{refused}");
    // This VM's identity: admitted, under the VM's node name.
    let me = ProviderIdentity::Proxmox { vmid: vm.vmid, smbios_uuid: uuid.clone() };
    let name = enroll_as(&env, &token, &vm.name, me.clone()).await.unwrap();
    assert_eq!(name, vm.name);
    // A second use, even with the right identity: refused; and the seed is no longer served.
    let refused = enroll_as(&env, &token, &vm.name, me).await.unwrap_err().to_string();
    assert!(refused.contains("TokenUsed"), "{refused}");
    assert_eq!(get("user-data").await.0, 404);
    assert_eq!(get("meta-data").await.0, 404);
    let unknown = seed.replace("/seed/", "/seed/0").to_string();
    assert_eq!(reqwest::get(format!("{unknown}user-data")).await.unwrap().status(), 404);
    // The record moves to bound once it sees the node.
    eventually(Duration::from_secs(10), "VM bound", async || {
        let records = env.c.running.provisioner.as_ref()?.records().ok()?;
        (records.len() == 1 && records[0].state == hexa_coordinator::proxmox::VmState::Bound).then_some(())
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_lock_timeouts_nextid_collisions_and_failed_starts_end_in_exactly_the_vms_wanted() {
    let env = Env::start(Timings::fast(), |_| {}).await;
    env.pve.inject(hexa_tests::pve::Fault::CloneLockTimeout { count: 1 });
    env.pve.inject(hexa_tests::pve::Fault::NextIdRace { count: 1 });
    env.pve.inject(hexa_tests::pve::Fault::FailTask {
        kind: "qmstart".into(),
        message: "start failed: QEMU exited with code 1".into(),
        count: 1,
    });
    env.create("rough", dedicated("S", 2)).await;
    let seen = env
        .errors_until(Duration::from_secs(90), async |env| {
            env.tenant("rough").await.is_some_and(|t| t.placement.dedicated_nodes.len() == 2)
        })
        .await;
    let has = |needle: &str| seen.iter().any(|e| e.contains(needle));
    assert!(has("got timeout"), "lock timeout not shown: {seen:?}");
    assert!(has("taken") || has("collided"), "nextid collision not shown: {seen:?}");
    assert!(has("start failed: QEMU exited with code 1"), "failed start not shown: {seen:?}");
    env.settled(2, Duration::from_secs(30)).await;
    // Only the failed start cost a VM (the lock timeout and the collision were retried in place),
    // and its reason is kept.
    let rows = env.provisioning().await;
    let failures = rows[0]["failures"].as_array().cloned().unwrap_or_default();
    assert_eq!(failures.len(), 1, "{rows}");
    assert_eq!(failures[0]["state"], "starting");
    assert!(failures[0]["reason"].as_str().unwrap().contains("start failed: QEMU exited with code 1"), "{rows}");
    // The VM whose start failed was destroyed; the squatter's VM is untouched.
    let vms = env.pve.vms();
    assert_eq!(vms.iter().filter(|v| v.name.starts_with("hx-")).count(), 2, "{vms:?}");
    assert_eq!(vms.iter().filter(|v| v.name.starts_with("someone-else-")).count(), 1, "{vms:?}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_that_never_registers_is_destroyed_and_replaced_with_the_reason_shown() {
    let env = Env::start(Timings::fast(), |s| s.registration_timeout = Duration::from_secs(3)).await;
    env.pve.inject(hexa_tests::pve::Fault::NeverBoot { count: 1 });
    env.create("late", dedicated("S", 1)).await;
    let seen = env
        .errors_until(Duration::from_secs(60), async |env| {
            env.tenant("late").await.is_some_and(|t| t.placement.dedicated_nodes.len() == 1)
        })
        .await;
    assert!(seen.iter().any(|e| e.contains("did not register within 3s")), "{seen:?}");
    env.settled(1, Duration::from_secs(30)).await;
    assert_eq!(env.pve.clones().len(), 2, "one VM, then its replacement");
    // Once all is well the reason is still kept: nothing in flight, one failure.
    let rows = env.provisioning().await;
    assert_eq!(rows.as_array().map(Vec::len), Some(1), "{rows}");
    assert!(rows[0].get("vms").is_none(), "{rows}");
    assert_eq!(rows[0]["failures"].as_array().map(Vec::len), Some(1), "{rows}");
    assert_eq!(rows[0]["failures"][0]["state"], "waiting_for_registration");
    assert!(rows[0]["failures"][0]["reason"].as_str().unwrap().contains("did not register within 3s"), "{rows}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_move_shared_to_dedicated_and_back_shrink_and_delete_leaving_nothing() {
    let env = Env::start(Timings::fast(), |_| {}).await;
    env.kube.add_node("shared-1", &[]).unwrap();
    let shared_node = env.c.spawn_agent("shared-1").await;
    eventually(Duration::from_secs(20), "shared node Ready", async || {
        env.c.admin.node("shared-1").await.filter(|n| n.health == hexa_coordinator::store::Health::Ready)
    })
    .await;
    let shared = json!({"kind": "shared", "cpu_millis": 500, "memory_bytes": 1u64 << 30, "pods": 10, "replicas": 1, "spread": 1});
    env.create("mover", shared.clone()).await;
    // Shared -> dedicated x2 -> dedicated x1 -> shared, never deleted.
    env.set_plan("mover", dedicated("S", 2)).await;
    env.bound("mover", 2, Duration::from_secs(60)).await;
    env.settled(2, Duration::from_secs(30)).await;
    env.set_plan("mover", dedicated("S", 1)).await;
    let one = env.bound("mover", 1, Duration::from_secs(30)).await;
    env.settled(1, Duration::from_secs(30)).await;
    let remaining = env.c.running.provisioner.as_ref().unwrap().records().unwrap();
    assert_eq!(remaining[0].node_name(), one.placement.dedicated_nodes[0], "the node still bound is the VM kept");
    env.set_plan("mover", shared).await;
    env.settled(0, Duration::from_secs(30)).await;
    let t = env.tenant("mover").await.unwrap();
    assert!(t.placement.dedicated_nodes.is_empty() && t.placement.shares.len() == 1, "{t:?}");

    // A dedicated tenant deleted: its VMs are destroyed and nothing of them is left.
    env.create("gone", dedicated("M", 1)).await;
    env.bound("gone", 1, Duration::from_secs(60)).await;
    let (status, _) = env.c.admin.request(reqwest::Method::DELETE, "/v1/tenants/gone", None).await;
    assert_eq!(status, 200);
    env.settled(0, Duration::from_secs(30)).await;
    assert_eq!(env.provisioning().await, json!([]));
    shared_node.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxmox_api_down_for_a_minute_delays_provisioning_and_nothing_leaks() {
    let mut timings = Timings::fast();
    timings.clone_full = Duration::from_secs(2);
    let env = Env::start(timings, |_| {}).await;
    env.create("patient", dedicated("S", 1)).await;
    eventually(Duration::from_secs(20), "clone under way", async || (env.pve.clones().len() == 1).then_some(())).await;
    env.pve.set_down(true);
    let outage = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while tokio::time::Instant::now() < outage {
        for row in env.provisioning().await.as_array().cloned().unwrap_or_default() {
            for vm in row["vms"].as_array().cloned().unwrap_or_default() {
                if let Some(e) = vm["last_error"].as_str().filter(|e| !seen.contains(&e.to_string())) {
                    seen.push(e.to_string());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(seen.iter().any(|e| e.contains("Proxmox API")), "the outage is not shown: {seen:?}");
    env.pve.set_down(false);
    env.bound("patient", 1, Duration::from_secs(60)).await;
    env.settled(1, Duration::from_secs(30)).await;
    assert_eq!(env.pve.clones().len(), 1, "the clone under way when the API went down was not repeated");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_with_sigkill_during_cloning_resumes_without_cloning_twice() {
    use hexa_tests::dedicated;
    use hexa_tests::procs::CoordinatorProc;
    hexa_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let mut timings = Timings::fast();
    timings.clone_full = Duration::from_secs(3);
    let pve = hexa_tests::pve::Pve::start(timings, &dedicated::TEMPLATES).await;
    let kube = std::sync::Arc::new(hexa_tests::fake_kube::FakeKube::start().await);
    let _boots = dedicated::boot_into_agents(&pve, dir.path(), kube.clone());
    let (quic, admin_port) = (hexa_tests::free_port(), hexa_tests::free_port());
    let settings = dedicated::settings(&pve, dir.path(), quic);
    let mut config = dedicated::coordinator_config(&kube, dir.path(), quic, settings);
    config.state_dir = dir.path().join("state");
    config.admin_listen = ([127, 0, 0, 1], admin_port).into();
    let path = dir.path().join("coordinator.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let mut first = CoordinatorProc::start_with(dir.path(), &path, quic, admin_port, "first.log").await;
    let body = json!({"name": "phoenix", "plan": dedicated("S", 1)});
    let (status, _) = first.admin.request(reqwest::Method::POST, "/v1/tenants", Some(body)).await;
    assert_eq!(status, 201);
    eventually(Duration::from_secs(20), "clone under way", async || {
        pve.vms().iter().any(|v| v.lock.as_deref() == Some("clone")).then_some(())
    })
    .await;
    first.proc.kill9();
    let second = CoordinatorProc::start_with(dir.path(), &path, quic, admin_port, "second.log").await;
    eventually(Duration::from_secs(60), "node bound after the restart", async || {
        let (_, t) = second.admin.request(reqwest::Method::GET, "/v1/tenants/phoenix", None).await;
        (t["placement"]["dedicated_nodes"].as_array().map(Vec::len) == Some(1)).then_some(())
    })
    .await;
    assert_eq!(pve.clones().len(), 1, "cloned twice: {:?}", pve.clones());
    assert_eq!(pve.vms().len(), 1);
    eventually(Duration::from_secs(10), "nothing left to provision", async || {
        let (_, rows) = second.admin.request(reqwest::Method::GET, "/v1/provisioning", None).await;
        (rows == json!([])).then_some(())
    })
    .await;
    pve.shutdown_vms().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_of_ours_that_no_record_knows_are_destroyed_at_start_and_others_are_left_alone() {
    hexa_tests::init();
    let pve = hexa_tests::pve::Pve::start(Timings::fast(), &hexa_tests::dedicated::TEMPLATES).await;
    // Left by a coordinator that died between destroying a VM and forgetting it, or mid-clone.
    pve.add_vm(120, "hx-k3v9q2m1xz", "hexabase;hx-tenant-old;hx-rec-k3v9q2m1xz", true);
    pve.add_vm(121, "hx-a1b2c3d4e5", "", false);
    // Someone else's.
    pve.add_vm(130, "web", "production", true);
    pve.add_vm(131, "hx-short", "", false);
    let env = Env::start_on(pve, |_| {}).await;
    eventually(Duration::from_secs(30), "orphans destroyed", async || {
        let names: Vec<String> = env.pve.vms().into_iter().map(|v| v.name).collect();
        (names == ["web", "hx-short"]).then_some(())
    })
    .await;
    // Nothing was wanted, so nothing is provisioned.
    assert_eq!(env.provisioning().await, json!([]));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_air_gapped_site_gets_the_agent_package_from_the_coordinator() {
    let package = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(package.path(), b"!<arch>\ndebian-binary   stand-in package body").unwrap();
    let deb = package.path().to_path_buf();
    let env = Env::start(Timings::fast(), |s| s.agent_deb = deb).await;
    env.create("island", dedicated("S", 1)).await;
    env.bound("island", 1, Duration::from_secs(60)).await;
    let vm = env.pve.vms().pop().unwrap();
    let log = env.boots.of(vm.vmid);
    assert!(log.iter().any(|l| l.starts_with("downloaded 45 bytes of hexa-agent.deb from http://")), "{log:?}");
    let fetched = std::fs::read(env.dir.path().join(format!("vms/vm-{}/tmp/hexa-agent.deb", vm.vmid))).unwrap();
    assert_eq!(fetched, std::fs::read(package.path()).unwrap());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedicated_node_lost_is_replaced_by_a_new_vm() {
    let env = Env::start(Timings::fast(), |_| {}).await;
    env.create("steady", dedicated("S", 1)).await;
    let first = env.bound("steady", 1, Duration::from_secs(60)).await.placement.dedicated_nodes[0].clone();
    let vm = env.pve.vms().pop().unwrap();
    assert_eq!(vm.name, first);
    // The guest hangs: its agent stops reporting, the node goes Lost.
    assert!(env.pve.hang(vm.vmid).await);
    let replaced = eventually(Duration::from_secs(60), "a new node bound", async || {
        env.tenant("steady")
            .await
            .filter(|t| t.placement.dedicated_nodes.len() == 1 && t.placement.dedicated_nodes[0] != first)
    })
    .await;
    env.settled(1, Duration::from_secs(30)).await;
    let vms = env.pve.vms();
    assert_eq!(vms.iter().map(|v| v.name.clone()).collect::<Vec<_>>(), replaced.placement.dedicated_nodes);
    assert!(env.c.admin.node(&first).await.is_none(), "the lost node is forgotten");
    env.stop().await;
}

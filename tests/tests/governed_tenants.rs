//! The agent runs the cgroup governor for the tenants placed on its node and reports their usage.
//! The kubelet's pod cgroups are a cgroup v2 tree under a fixture root (this machine mounts v1;
//! the governor itself is tested on the real v1 hierarchy in cgroup_governor.rs).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hexa_agent::pods::StaticPodSource;
use hexa_coordinator::config::CoordinatorConfig;
use hexa_coordinator::store::Health;
use hexa_shared::report::PodInfo;
use hexa_tests::eventually;
use hexa_tests::inproc::{Coordinator, test_host};
use reqwest::Method;
use serde_json::json;

const POD: &str = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podaaaa_1111.slice";

/// A pod cgroup as kubelet leaves it (systemd driver): no limits, some usage.
fn kubelet_pod(root: &Path, memory: u64) {
    std::fs::write(root.join("cgroup.controllers"), "cpuset cpu io memory pids\n").unwrap();
    let dir = root.join(POD);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, content) in [
        ("cgroup.controllers", "cpu memory pids\n".to_string()),
        ("cgroup.procs", String::new()),
        ("cpu.max", "max 100000\n".into()),
        ("memory.max", "max\n".into()),
        ("memory.high", "max\n".into()),
        ("pids.max", "max\n".into()),
        ("memory.current", format!("{memory}\n")),
        ("pids.current", "3\n".into()),
        ("cpu.stat", "usage_usec 1000\nuser_usec 0\nsystem_usec 0\nnr_periods 0\nnr_throttled 0\n".into()),
    ] {
        std::fs::write(dir.join(name), content).unwrap();
    }
}

/// An agent whose cgroup root is a fixture tree holding one kubelet-shaped pod of tenant acme
/// (using `memory` bytes), running until `stop` turns true; returns once the node is Ready.
async fn governed_node(
    c: &Coordinator,
    name: &str,
    memory: u64,
) -> (tempfile::TempDir, tokio::sync::watch::Sender<bool>, tokio::task::JoinHandle<Result<(), hexa_agent::AgentError>>)
{
    let cgroups = tempfile::tempdir().unwrap();
    kubelet_pod(cgroups.path(), memory);
    let token = c.admin.token("shared", "10m").await;
    let config = c.agent_config(name, &token);
    let pods = Arc::new(StaticPodSource::new(vec![PodInfo {
        namespace: "hx-acme".into(),
        name: "web".into(),
        uid: "aaaa-1111".into(),
        ip: Some("10.42.0.9".parse().unwrap()),
        tenant: Some("acme".into()),
    }]));
    let host = hexa_agent::Host { cgroup_root: cgroups.path().to_path_buf(), pods, ..test_host(&config) };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(hexa_agent::run(config, host, stopped));
    eventually(Duration::from_secs(20), "node Ready", async || {
        c.admin.node(name).await.filter(|n| n.health == Health::Ready)
    })
    .await;
    (cgroups, stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_placed_on_a_node_are_held_to_their_allocation_and_their_usage_reported() {
    let c = Coordinator::start().await;
    let (cgroups, stop, task) = governed_node(&c, "gov-node", 40 << 20).await;
    let pod = cgroups.path().join(POD);
    let read = |file: &str| std::fs::read_to_string(pod.join(file)).unwrap().trim().to_string();

    // Before acme is placed here its pod is of a tenant the node knows no allocation for: held to
    // the unknown-tenant default meanwhile, not left unlimited.
    let unknown = hexa_agent::isolation::cgroup::UnknownTenantCap::default();
    eventually(Duration::from_secs(30), "unknown tenant's pod capped", async || {
        (read("memory.max") == unknown.memory_bytes.to_string()).then_some(())
    })
    .await;
    assert_eq!(read("cpu.max"), "25000 100000");
    assert_eq!(read("pids.max"), unknown.pids.to_string());

    let plan = json!({"kind": "shared", "cpu_millis": 500, "memory_bytes": 256u64 << 20, "pods": 4, "replicas": 1, "spread": 1});
    let (status, body) =
        c.admin.request(Method::POST, "/v1/tenants", Some(json!({"name": "acme", "plan": plan}))).await;
    assert_eq!(status, 201, "{body}");

    // The pod is capped at the tenant's allocation on this node.
    eventually(Duration::from_secs(30), "pod capped", async || (read("cpu.max") == "50000 100000").then_some(())).await;
    assert_eq!(read("memory.max"), (256u64 << 20).to_string());
    assert_eq!(read("cpu.max"), "50000 100000");
    assert_eq!(read("pids.max"), (4 * 1024).to_string());
    assert_eq!(read("cgroup.procs"), "", "the governor never moves processes");

    // And the tenant's usage on the node is in the node's report.
    let node = eventually(Duration::from_secs(30), "usage reported", async || {
        c.admin.node("gov-node").await.filter(|n| !n.tenant_usage.is_empty())
    })
    .await;
    let usage = &node.tenant_usage[0];
    assert_eq!((usage.tenant.as_str(), usage.pods, usage.memory_bytes, usage.pids), ("acme", 1, 40 << 20, 3));
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
}

/// The pids cap a governed pod gets is decided by the coordinator, from its own config file's
/// `[isolation] pids_per_pod`, carried in the node's spec, and written by the agent as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pids_cap_on_a_tenant_pod_is_the_coordinators_pids_per_pod() {
    const PIDS_PER_POD: u64 = 321;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        format!("[isolation]\nenabled = true\npod_cidr = \"10.42.0.0/16\"\npids_per_pod = {PIDS_PER_POD}\n"),
    )
    .unwrap();
    let from_file: CoordinatorConfig =
        hexa_shared::config::load(Some(file.path()), "/nonexistent".as_ref(), std::iter::empty()).unwrap();
    assert_eq!(from_file.isolation.pids_per_pod, PIDS_PER_POD);
    let c = Coordinator::start_tuned(|config| config.isolation = from_file.isolation).await;

    let (cgroups, stop, task) = governed_node(&c, "pids-node", 8 << 20).await;

    let plan = json!({"kind": "shared", "cpu_millis": 500, "memory_bytes": 256u64 << 20, "pods": 3, "replicas": 1, "spread": 1});
    let (status, body) =
        c.admin.request(Method::POST, "/v1/tenants", Some(json!({"name": "acme", "plan": plan}))).await;
    assert_eq!(status, 201, "{body}");

    // The spec the node is sent carries the whole allocation, pids included.
    let wanted = 3 * PIDS_PER_POD;
    let node = eventually(Duration::from_secs(30), "tenant placed", async || {
        c.admin.node("pids-node").await.filter(|n| !n.tenants.is_empty())
    })
    .await;
    assert_eq!(node.tenants[0].tenant, "acme");
    assert_eq!(node.tenants[0].pids, Some(wanted), "{:?}", node.tenants);

    // And the agent's governor writes exactly that into the pod's cgroup.
    let pod = cgroups.path().join(POD);
    let read = |file: &str| std::fs::read_to_string(pod.join(file)).unwrap().trim().to_string();
    eventually(Duration::from_secs(30), "pod pids capped", async || {
        (read("pids.max") == wanted.to_string()).then_some(())
    })
    .await;
    assert_eq!(read("pids.max"), wanted.to_string(), "3 pods x pids_per_pod {PIDS_PER_POD}");
    assert_eq!(read("memory.max"), (256u64 << 20).to_string());
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
}

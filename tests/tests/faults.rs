//! Faults at the scale a test can hold, each bounded in time: the coordinator killed with SIGKILL in
//! the middle of a burst of tenant creates, and a node's link cut for a minute in network
//! namespaces. What must hold: nothing acknowledged is lost or doubled, a cut node goes
//! Unreachable then Lost at the thresholds and its shares move exactly once, its isolation stays as
//! it was while it is cut off, and once healed it converges on the current spec.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hexa_coordinator::store::Health;
use hexa_shared::tenant::Tenant;
use hexa_tests::admin::AdminClient;
use hexa_tests::burst::CreateBurst;
use hexa_tests::netns::{self, Topology};
use hexa_tests::procs::{CoordinatorProc, Proc};
use hexa_tests::{eventually, free_port};
use reqwest::Method;
use serde_json::json;

fn small_plan(spread: u32) -> serde_json::Value {
    // The least each share may have: 100m and 128 MiB.
    let (cpu, memory) = (100 * u64::from(spread), (128u64 << 20) * u64::from(spread));
    json!({"kind": "shared", "cpu_millis": cpu, "memory_bytes": memory, "pods": 2 * spread, "replicas": 1, "spread": spread})
}

async fn tenants(admin: &AdminClient) -> Vec<Tenant> {
    let (status, body) = admin.request(Method::GET, "/v1/tenants", None).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body).unwrap()
}

/// Every share of every tenant is booked on its node exactly once, and nowhere else.
async fn bookings_match_placements(admin: &AdminClient) {
    let mut booked: BTreeMap<(String, String), usize> = BTreeMap::new();
    for node in admin.nodes().await {
        for allocation in &node.tenants {
            *booked.entry((allocation.tenant.clone(), node.name.clone())).or_default() += 1;
        }
    }
    let mut placed: BTreeMap<(String, String), usize> = BTreeMap::new();
    for tenant in tenants(admin).await {
        for share in &tenant.placement.shares {
            *placed.entry((tenant.name.clone(), share.node.clone())).or_default() += 1;
        }
    }
    // A node carries one allocation per tenant, however many of its shares it holds.
    let placed: BTreeMap<_, _> = placed.into_keys().map(|k| (k, 1)).collect();
    assert_eq!(booked, placed, "node bookings and tenant placements disagree");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_in_a_burst_of_creates_loses_and_doubles_nothing() {
    hexa_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let (quic, admin_port) = (free_port(), free_port());
    let mut c = CoordinatorProc::start(dir.path(), quic, admin_port, "coordinator-1.log").await;
    let agents = c.spawn_shared_agents(dir.path(), &["n1", "n2", "n3"]).await;
    c.wait_ready(3).await;

    // Four clients create tenants as fast as the coordinator answers; it is killed after the
    // twentieth acknowledgement, whatever is in flight.
    let burst = CreateBurst::start(&c.admin, 4, 25, small_plan(1));
    eventually(Duration::from_secs(60), "twenty creates acknowledged", async || {
        (burst.acked_count() >= 20).then_some(())
    })
    .await;
    c.proc.kill9();
    let outcome = burst.finish().await;
    eprintln!("killed after {} acknowledged creates, {} in flight", outcome.acked.len(), outcome.in_doubt.len());

    let c = CoordinatorProc::start(dir.path(), quic, admin_port, "coordinator-2.log").await;
    let restarted = Instant::now();
    let after: Vec<Tenant> = tenants(&c.admin).await;
    outcome.check(&after.iter().map(|t| t.name.as_str()).collect::<Vec<_>>());
    for tenant in &after {
        assert!(tenant.placement.shares.len() <= 1, "{} has {} shares", tenant.name, tenant.placement.shares.len());
    }

    // Every agent comes back on its own, and every tenant ends placed once.
    eventually(Duration::from_secs(30), "agents back and Ready", async || {
        let nodes = c.admin.nodes().await;
        (nodes.len() == 3 && nodes.iter().all(|n| n.health == Health::Ready && n.connected)).then_some(())
    })
    .await;
    eprintln!("every agent back {:?} after the restart", restarted.elapsed());
    eventually(Duration::from_secs(30), "every tenant placed", async || {
        tenants(&c.admin).await.iter().all(|t| t.placement.shares.len() == 1).then_some(())
    })
    .await;
    bookings_match_placements(&c.admin).await;
    let (status, body) =
        c.admin.request(Method::POST, "/v1/tenants", Some(json!({"name": "after", "plan": small_plan(1)}))).await;
    assert_eq!(status, 201, "{body}");
    drop(agents);
}

/// Runs `body` on a thread of its own inside network namespace `netns`, with its own runtime:
/// every socket it opens (the coordinator's listeners, the admin client's) lives there.
fn in_netns<F, Fut>(netns: &str, body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let path = format!("/var/run/netns/{netns}");
    let thread = std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(body());
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

/// The node's firewall and sets as they stand (counters left out).
fn firewall_state(topology: &Topology, node: &str) -> String {
    let rules = topology.exec(node, &["iptables-save", "-t", "mangle"]).unwrap();
    let sets = topology.exec(node, &["ipset", "save"]).unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&rules.stdout), String::from_utf8_lossy(&sets.stdout));
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.find(" [") {
            Some(at) if l.starts_with(':') => &l[..at],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A `hexa-agent` process in node `node`'s namespace, enrolling at `coordinator`.
fn agent_in(
    topology: &Topology,
    dir: &Path,
    node: &str,
    coordinator: std::net::SocketAddr,
    token: &str,
    ca: &str,
) -> Proc {
    let config = dir.join(format!("{node}.toml"));
    let text = format!(
        "coordinator = \"{coordinator}\"\ntoken = \"{token}\"\nca_hash = \"{ca}\"\nstate_dir = \"{}\"\nnode_name = \"{node}\"\n\
         ephemeral_path = \"{}\"\n[isolation]\npod_bridge = \"br0\"\ncni_results_dir = \"{}\"\n",
        dir.join(node).display(),
        dir.display(),
        dir.join(format!("{node}-cni")).display(),
    );
    std::fs::write(&config, text).unwrap();
    let mut args = vec!["netns".to_string(), "exec".into(), topology.netns(node).to_string()];
    args.push(hexa_tests::bin("hexa-agent").display().to_string());
    args.extend(["--config".to_string(), config.display().to_string()]);
    Proc::spawn(Path::new("ip"), &args, dir.join(format!("{node}.log")))
}

#[test]
fn a_node_cut_off_for_a_minute_is_lost_its_shares_move_once_and_it_converges_on_heal() {
    if let Some(why) = netns::unavailable(&["ip", "iptables", "ipset"]) {
        eprintln!("a_node_cut_off_for_a_minute_is_lost_its_shares_move_once_and_it_converges_on_heal: skipped: {why}");
        return;
    }
    hexa_tests::init();
    let topology = Topology::builder()
        .node("a", "10.42.0.0/24")
        .node("b", "10.42.1.0/24")
        .node("c", "10.42.2.0/24")
        .management("192.168.100.10")
        .build()
        .unwrap();
    let mgmt = topology.netns("mgmt").to_string();
    let topology = Arc::new(topology);
    let t = topology.clone();
    in_netns(&mgmt, move || async move {
        let topology = t;
        let dir = tempfile::tempdir().unwrap();
        let (unreachable_after, lost_after) = (Duration::from_secs(3), Duration::from_secs(10));
        let c = hexa_tests::inproc::Coordinator::start_tuned(|config| {
            config.quic_listen = "192.168.100.10:0".parse().unwrap();
            config.report_interval = Duration::from_secs(1);
            config.unreachable_after = unreachable_after;
            config.lost_after = lost_after;
            config.isolation.enabled = true;
        })
        .await;
        let ca = c.running.ca_hash.to_string();
        let mut agents = Vec::new();
        for node in ["a", "b", "c"] {
            let token = c.admin.token("shared", "10m").await;
            agents.push(agent_in(&topology, dir.path(), node, c.running.quic_addr, &token, &ca));
        }
        eventually(Duration::from_secs(60), "three nodes Ready with their specs applied", async || {
            let nodes = c.admin.nodes().await;
            (nodes.len() == 3
                && nodes.iter().all(|n| n.health == Health::Ready && n.applied_generation == Some(n.spec_generation)))
            .then_some(())
        })
        .await;
        let (status, body) =
            c.admin.request(Method::POST, "/v1/tenants", Some(json!({"name": "acme", "plan": small_plan(2)}))).await;
        assert_eq!(status, 201, "{body}");
        let placed: Tenant = serde_json::from_value(body).unwrap();
        let holders: BTreeSet<String> = placed.placement.shares.iter().map(|s| s.node.clone()).collect();
        let victim = holders.iter().next().unwrap().clone();
        let spare = ["a", "b", "c"].into_iter().find(|n| !holders.contains(*n)).unwrap().to_string();
        eventually(Duration::from_secs(30), "the victim applied the tenant's spec", async || {
            c.admin.node(&victim).await.filter(|n| n.applied_generation == Some(n.spec_generation))
        })
        .await;
        let generation_before = c.admin.node(&victim).await.unwrap().spec_generation;
        let before = firewall_state(&topology, &victim);
        assert!(before.contains("hx-t-acme"), "{before}");

        // Cut: the victim's LAN link goes down for a minute.
        topology.exec(&victim, &["ip", "link", "set", "lan0", "down"]).unwrap();
        let cut = Instant::now();
        let mut seen = vec![Health::Ready];
        let mut placements = vec![holders.clone()];
        let mut lost_after_cut = None;
        let mut isolation_checks = 0;
        while cut.elapsed() < Duration::from_secs(60) {
            let node = c.admin.node(&victim).await.unwrap();
            if seen.last() != Some(&node.health) {
                seen.push(node.health);
                if node.health == Health::Lost {
                    lost_after_cut = Some(cut.elapsed());
                }
            }
            let tenant: Tenant =
                serde_json::from_value(c.admin.request(Method::GET, "/v1/tenants/acme", None).await.1).unwrap();
            let now: BTreeSet<String> = tenant.placement.shares.iter().map(|s| s.node.clone()).collect();
            if placements.last() != Some(&now) {
                placements.push(now);
            }
            // Fail-static: nothing the node enforces changes while it cannot hear the coordinator.
            if cut.elapsed().as_secs() % 10 == 5 && isolation_checks < cut.elapsed().as_secs() / 10 + 1 {
                assert_eq!(firewall_state(&topology, &victim), before, "isolation changed while cut off");
                isolation_checks += 1;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(seen, [Health::Ready, Health::Unreachable, Health::Lost], "health while cut");
        let lost_after_cut = lost_after_cut.unwrap();
        eprintln!("node loss detected {lost_after_cut:?} after the cut (threshold {lost_after:?})");
        // Silence counts from the last report, at most one interval before the cut.
        assert!(lost_after_cut + Duration::from_secs(1) >= lost_after, "Lost before its threshold: {lost_after_cut:?}");
        let moved: BTreeSet<String> =
            holders.iter().filter(|n| **n != victim).cloned().chain([spare.clone()]).collect();
        assert_eq!(placements, [holders.clone(), moved.clone()], "the share moves exactly once, to the spare node");
        assert!(isolation_checks >= 5, "isolation checked {isolation_checks} times while cut");
        assert_eq!(firewall_state(&topology, &victim), before, "isolation changed while cut off");

        // Heal: the node comes back, applies the current spec (which no longer holds the tenant),
        // and the tenant does not move back.
        topology.exec(&victim, &["ip", "link", "set", "lan0", "up"]).unwrap();
        let healed = eventually(Duration::from_secs(90), "the victim back and converged", async || {
            c.admin.node(&victim).await.filter(|n| {
                n.health == Health::Ready
                    && n.spec_generation > generation_before
                    && n.applied_generation == Some(n.spec_generation)
            })
        })
        .await;
        assert_eq!(healed.apply_error, None);
        let tenant: Tenant =
            serde_json::from_value(c.admin.request(Method::GET, "/v1/tenants/acme", None).await.1).unwrap();
        let now: BTreeSet<String> = tenant.placement.shares.iter().map(|s| s.node.clone()).collect();
        assert_eq!(now, moved, "the share moved again after the heal");
        drop(agents);
        c.running.shutdown().await;
    });
}

//! Coordinators sharing one etcd (three real members on loopback) and one CA sealed in it: one
//! leads and serves, the others follow (agents sent to the leader, the admin API read from the
//! store or forwarded); a leader killed is replaced once its lease runs out, with every acknowledged
//! write there, and agents move to the new leader with no node marked Lost; a leader stopped is
//! replaced too, and when it wakes up it cannot write, steps down (exit status 75) and, started
//! again, follows; one etcd member lost changes nothing, and without a quorum writes are refused,
//! saying why, until it is back.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use hexa_coordinator::store::Health;
use hexa_tests::admin::AdminClient;
use hexa_tests::burst::CreateBurst;
use hexa_tests::etcd::{self, EtcdCluster};
use hexa_tests::procs::{Proc, spawn_agent_to};
use hexa_tests::{eventually, free_port};

/// The leader key's lease: a leader that has not renewed it for this long is replaced.
const LEASE_TTL: Duration = Duration::from_secs(2);

/// One coordinator's configuration and state directory, on its own loopback ports. A new leader
/// gives nodes `lost_after` to come over before their silence counts; agents may take several
/// seconds (a dead coordinator's address tried first, then their backoff), so it is 8 s here.
struct Coordinator {
    dir: PathBuf,
    config: PathBuf,
    admin_port: u16,
    quic_port: u16,
}

impl Coordinator {
    fn new(root: &Path, name: &str, endpoints: &[String]) -> Coordinator {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let (quic_port, admin_port) = (free_port(), free_port());
        let endpoints: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
        let text = format!(
            "state_dir = \"{}\"\nquic_listen = \"127.0.0.1:{quic_port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n\
             report_interval = \"300ms\"\nunreachable_after = \"1s\"\nlost_after = \"8s\"\n\
             [k3s]\nmanage = false\n[hostcluster]\nmode = \"off\"\n[isolation]\nenabled = false\n\
             [store]\nbackend = \"etcd\"\nendpoints = [{}]\nprefix = \"/ha/\"\nlease_ttl = \"{}s\"\n",
            dir.join("state").display(),
            endpoints.join(", "),
            LEASE_TTL.as_secs(),
        );
        let config = dir.join("coordinator.toml");
        std::fs::write(&config, text).unwrap();
        Coordinator { dir, config, admin_port, quic_port }
    }

    fn start(&self, log: &str) -> Proc {
        Proc::spawn(
            &hexa_tests::bin("hexa-coordinator"),
            &["--config".into(), self.config.display().to_string()],
            self.dir.join(log),
        )
    }

    /// Its admin API (the token exists once it has led, or was shared with it).
    fn admin(&self) -> AdminClient {
        AdminClient::new(self.base(), self.token())
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.dir.join("state/admin.token")).unwrap().trim().to_string()
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }
}

/// True once `proc` leads and serves: it prints its addresses only then.
fn serves(proc: &Proc) -> bool {
    proc.stdout_text().contains(" admin http://")
}

/// Waits until `proc` says it waits to lead, and checks that it answers as a follower meanwhile.
async fn follows(proc: &Proc, coordinator: &Coordinator) {
    eventually(Duration::from_secs(20), "a coordinator waiting to lead", async || {
        proc.log_text().contains("waiting to lead").then_some(())
    })
    .await;
    assert!(!serves(proc), "a follower leads:\n{}", proc.stdout_text());
    let health = eventually(Duration::from_secs(10), "a follower's admin API", async || {
        reqwest::get(format!("{}/healthz", coordinator.base())).await.ok()
    })
    .await;
    assert_eq!(health.status(), 200);
    assert_eq!(health.headers()["x-hexa-coordinator"], "follower", "{:?}", health.headers());
}

/// Gives `standby` what the README says to copy from the first coordinator: the seal key of the
/// CA they share in etcd, and the admin token they share.
fn share_secrets(first: &Coordinator, standby: &Coordinator) {
    let state = standby.dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    for file in ["ca-seal.key", "admin.token"] {
        std::fs::copy(first.dir.join("state").join(file), state.join(file)).unwrap();
    }
}

/// How long after `since` the process first served (polled every 50 ms).
async fn served_after(proc: &Proc, since: Instant, within: Duration) -> Duration {
    while !serves(proc) {
        assert!(since.elapsed() < within, "no new leader within {within:?}; its log:\n{}", proc.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    since.elapsed()
}

/// Coordinators `a` and `b` on `cluster`: `a` started first and leading, `b` given its secrets and
/// following.
async fn leader_and_follower(root: &Path, cluster: &EtcdCluster) -> (Coordinator, Coordinator, Proc, Proc) {
    let (a, b) = (Coordinator::new(root, "a", &cluster.endpoints()), Coordinator::new(root, "b", &cluster.endpoints()));
    let leader = a.start("a-1.log");
    eventually(Duration::from_secs(30), "the first coordinator leading", async || serves(&leader).then_some(())).await;
    share_secrets(&a, &b);
    let follower = b.start("b-1.log");
    follows(&follower, &b).await;
    (a, b, leader, follower)
}

/// A plan that needs no node to be accepted: a dedicated node of class S, which (without a
/// provisioner) waits for a node enrolled for it.
fn plan() -> Value {
    json!({"kind": "dedicated", "node_class": "S", "count": 1})
}

async fn tenant_names(admin: &AdminClient) -> Vec<String> {
    let (status, body) = admin.request(reqwest::Method::GET, "/v1/tenants", None).await;
    assert_eq!(status, 200, "{body}");
    body.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_in_a_burst_of_creates_is_replaced_and_agents_follow_with_nothing_lost() {
    hexa_tests::init();
    assert!(etcd::unavailable().is_none(), "needs a real etcd: {:?}", etcd::unavailable());
    let cluster = EtcdCluster::start(3);
    let root = tempfile::tempdir().unwrap();
    let coordinators: Vec<Coordinator> =
        ["a", "b", "c"].iter().map(|name| Coordinator::new(root.path(), name, &cluster.endpoints())).collect();
    let mut first = coordinators[0].start("a-1.log");
    eventually(Duration::from_secs(30), "the first coordinator leading", async || serves(&first).then_some(())).await;
    for standby in &coordinators[1..] {
        share_secrets(&coordinators[0], standby);
    }
    let mut standbys: Vec<Proc> = Vec::new();
    for (i, standby) in coordinators[1..].iter().enumerate() {
        let proc = standby.start(&format!("{}-1.log", ["b", "c"][i]));
        follows(&proc, standby).await;
        standbys.push(proc);
    }

    // Agents given every coordinator's address, but the last one only a follower's: the follower
    // sends it to the leader.
    let ca = first.stdout_text().lines().find_map(|l| l.strip_prefix("CA ").map(str::to_string)).unwrap();
    let everyone: Vec<String> = coordinators.iter().map(|c| format!("127.0.0.1:{}", c.quic_port)).collect();
    let admin = coordinators[0].admin();
    let mut agents = Vec::new();
    let names = ["n1", "n2", "n3"];
    for name in names {
        let token = admin.token("shared", "10m").await;
        let given = if name == "n3" { everyone[1].clone() } else { everyone.join(",") };
        agents.push(spawn_agent_to(root.path(), name, &given, &token, &ca));
    }
    eventually(Duration::from_secs(30), "three nodes Ready on the first leader", async || {
        let nodes = admin.nodes().await;
        (nodes.len() == 3 && nodes.iter().all(|n| n.health == Health::Ready && n.connected)).then_some(())
    })
    .await;
    assert!(agents[2].log_text().contains("linking to the leader"), "{}", agents[2].log_text());
    // A follower's admin API: tenants from the store, the rest (a write, the nodes' live state)
    // forwarded to the leader.
    let via_follower = AdminClient::new(coordinators[1].base(), coordinators[0].token());
    let (status, body) = via_follower
        .request(reqwest::Method::POST, "/v1/tenants", Some(json!({"name": "via-follower", "plan": plan()})))
        .await;
    assert_eq!(status, 201, "{body}");
    assert!(tenant_names(&via_follower).await.contains(&"via-follower".to_string()));
    assert_eq!(via_follower.nodes().await.len(), 3);
    let (status, body) = via_follower.with_token("wrong").request(reqwest::Method::GET, "/v1/tenants", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("unauthorized")), "{body}");

    // Past a whole lease: the standbys still wait while the leader keeps its lease.
    tokio::time::sleep(LEASE_TTL * 2).await;
    assert!(!standbys.iter().any(serves), "a standby took over from a live leader");

    // Four clients create tenants as fast as the leader answers; it is killed after the
    // twentieth acknowledgement, whatever is in flight.
    let burst = CreateBurst::start(&admin, 4, 50, plan());
    eventually(Duration::from_secs(60), "twenty creates acknowledged", async || {
        (burst.acked_count() >= 20).then_some(())
    })
    .await;
    first.kill9();
    let killed = Instant::now();
    let outcome = burst.finish().await;

    let (leader, follower) = loop {
        if let Some(i) = standbys.iter().position(serves) {
            break (i, 1 - i);
        }
        assert!(killed.elapsed() < LEASE_TTL + Duration::from_secs(20), "no new leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let new_leader_after = killed.elapsed();
    let admin = coordinators[1 + leader].admin();
    let mut moved = Duration::ZERO;
    eventually(Duration::from_secs(30), "every agent on the new leader", async || {
        let nodes = admin.nodes().await;
        let all = nodes.len() == 3
            && nodes.iter().all(|n| n.connected && n.health == Health::Ready && n.last_report_seq.is_some());
        moved = killed.elapsed();
        all.then_some(())
    })
    .await;
    eprintln!(
        "leader killed after {} acknowledged creates ({} in flight): a new leader served {:.2} s later (lease TTL {} s); \
         all {} agents on it {:.2} s after the kill",
        outcome.acked.len(),
        outcome.in_doubt.len(),
        new_leader_after.as_secs_f64(),
        LEASE_TTL.as_secs(),
        names.len(),
        moved.as_secs_f64()
    );

    // Every acknowledged create is there once; nothing exists that was not sent.
    let listed = tenant_names(&admin).await;
    outcome.check(&listed.iter().map(String::as_str).filter(|name| *name != "via-follower").collect::<Vec<_>>());
    // No node was marked Lost by the failover, and there is one leader.
    let log = standbys[leader].log_text();
    assert!(!log.contains("to=Lost") && !log.contains("to=Unreachable"), "the failover marked a node:\n{log}");
    assert!(!serves(&standbys[follower]), "two leaders");
    for agent in &agents {
        assert!(!agent.log_text().contains("refused"), "{}", agent.log_text());
    }
    // The new leader writes; the old one, started again, follows.
    let (status, body) =
        admin.request(reqwest::Method::POST, "/v1/tenants", Some(json!({"name": "after", "plan": plan()}))).await;
    assert_eq!(status, 201, "{body}");
    let again = coordinators[0].start("a-2.log");
    follows(&again, &coordinators[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_leader_is_replaced_and_once_resumed_cannot_write_and_steps_down() {
    hexa_tests::init();
    assert!(etcd::unavailable().is_none(), "needs a real etcd: {:?}", etcd::unavailable());
    let cluster = EtcdCluster::start(3);
    let root = tempfile::tempdir().unwrap();
    let (a, b, mut leader, follower) = leader_and_follower(root.path(), &cluster).await;
    let (status, body) =
        a.admin().request(reqwest::Method::POST, "/v1/tenants", Some(json!({"name": "before", "plan": plan()}))).await;
    assert_eq!(status, 201, "{body}");

    // SIGSTOP: the leader neither renews its lease nor knows that it stopped.
    let pid = Pid::from_raw(leader.pid() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    let stopped = Instant::now();
    let failover = served_after(&follower, stopped, LEASE_TTL + Duration::from_secs(20)).await;
    eprintln!(
        "leader stopped; the follower served {:.2} s later (lease TTL {} s)",
        failover.as_secs_f64(),
        LEASE_TTL.as_secs()
    );
    let (status, body) =
        b.admin().request(reqwest::Method::POST, "/v1/tenants", Some(json!({"name": "by-new", "plan": plan()}))).await;
    assert_eq!(status, 201, "{body}");

    // Resumed, the old leader still serves for a moment: a write through it is refused, and
    // nothing of it lands.
    kill(pid, Signal::SIGCONT).unwrap();
    let resumed = Instant::now();
    let stale = a
        .admin()
        .request_raw(reqwest::Method::POST, "/v1/tenants", Some(json!({"name": "by-old", "plan": plan()})))
        .await;
    // Either it is gone already, or it refuses, saying why.
    if let Ok((status, body)) = &stale {
        assert_eq!((*status, body["error"]["code"].as_str()), (503, Some("unavailable")), "{body}");
        eprintln!("the resumed leader answered a write: {body}");
    }
    // It steps down on its own: exit status 75, for its service manager to start it as a follower.
    let exited = eventually(LEASE_TTL + Duration::from_secs(20), "the deposed leader exiting", async || {
        leader.child.try_wait().unwrap()
    })
    .await;
    eprintln!("the resumed leader stepped down {:.2} s after SIGCONT", resumed.elapsed().as_secs_f64());
    assert_eq!(exited.code(), Some(75), "{exited:?}\n{}", leader.log_text());
    assert!(leader.log_text().contains("no longer leading"), "{}", leader.log_text());
    let names = tenant_names(&b.admin()).await;
    assert_eq!(names, ["before", "by-new"], "the deposed leader wrote");

    let again = a.start("a-2.log");
    follows(&again, &a).await;
}

/// Waits until one of `procs` leads and serves; returns its index.
async fn a_leader(procs: &[&Proc], within: Duration) -> usize {
    eventually(within, "a coordinator leading", async || procs.iter().position(|p| serves(p))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_member_lost_changes_nothing_and_a_lost_quorum_refuses_writes_until_it_is_back() {
    hexa_tests::init();
    assert!(etcd::unavailable().is_none(), "needs a real etcd: {:?}", etcd::unavailable());
    let mut cluster = EtcdCluster::start(3);
    let root = tempfile::tempdir().unwrap();
    let (a, b, mut leader, mut follower) = leader_and_follower(root.path(), &cluster).await;
    let ca = leader.stdout_text().lines().find_map(|l| l.strip_prefix("CA ").map(str::to_string)).unwrap();
    let token = a.admin().token("shared", "10m").await;
    let both = format!("127.0.0.1:{},127.0.0.1:{}", a.quic_port, b.quic_port);
    let mut agent = spawn_agent_to(root.path(), "n1", &both, &token, &ca);
    let ready = async |admin: &AdminClient| {
        let nodes = admin.nodes().await;
        (nodes.len() == 1 && nodes[0].connected && nodes[0].health == Health::Ready).then_some(())
    };
    eventually(Duration::from_secs(30), "the node Ready", async || ready(&a.admin()).await).await;
    let create = async |admin: &AdminClient, name: &str| {
        admin.request(reqwest::Method::POST, "/v1/tenants", Some(json!({"name": name, "plan": plan()}))).await
    };
    let (status, body) = create(&a.admin(), "t1").await;
    assert_eq!(status, 201, "{body}");

    // One member of three killed: the same leader writes on, the node stays Ready, and a
    // coordinator started meanwhile follows.
    cluster.kill(0);
    let (status, body) = create(&a.admin(), "t2").await;
    assert_eq!(status, 201, "with a member killed: {body}");
    follower.kill9();
    follower = b.start("b-2.log");
    follows(&follower, &b).await;
    tokio::time::sleep(LEASE_TTL * 2).await;
    assert!(serves(&leader) && leader.child.try_wait().unwrap().is_none(), "{}", leader.log_text());
    ready(&a.admin()).await.expect("the node Ready with a member killed");

    // A second member killed: no quorum. The leader cannot keep its lease and steps down; the
    // follower refuses writes, saying why; the agent keeps what it applied.
    let spec_before = std::fs::read(root.path().join("n1/spec.json")).unwrap();
    cluster.kill(1);
    let lost = Instant::now();
    let exited = eventually(LEASE_TTL + Duration::from_secs(20), "the leader stepping down", async || {
        leader.child.try_wait().unwrap()
    })
    .await;
    assert_eq!(exited.code(), Some(75), "{}", leader.log_text());
    eprintln!("quorum lost: the leader stepped down {:.2} s later", lost.elapsed().as_secs_f64());
    let via_follower = b.admin();
    // Until the follower learns that the leader is gone, it says the leader does not answer;
    // then, why there is none.
    let refused = eventually(Duration::from_secs(20), "the follower refusing a write, saying why", async || {
        let (status, body) = create(&via_follower, "during").await;
        assert_eq!(status, 503, "{body}");
        body["error"]["message"].as_str().unwrap().contains("no leader").then_some(body)
    })
    .await;
    assert_eq!(refused["error"]["code"], "unavailable", "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("no leader") && message.contains("etcd"), "{message}");
    eprintln!("a write during the outage: 503 {message}");
    let (status, body) = via_follower.request(reqwest::Method::GET, "/v1/tenants", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("unavailable")), "{body}");
    // Started again by its service manager while there is no quorum, the old leader fails its
    // start, saying why, until etcd answers.
    let mut restarted = a.start("a-2.log");
    let failed = eventually(Duration::from_secs(30), "a start without a quorum failing", async || {
        restarted.child.try_wait().unwrap()
    })
    .await;
    let said = restarted.log_text();
    assert!(!failed.success() && said.contains("quorum"), "{failed:?}: {said}");
    assert!(agent.child.try_wait().unwrap().is_none(), "the agent stopped:\n{}", agent.log_text());
    assert_eq!(std::fs::read(root.path().join("n1/spec.json")).unwrap(), spec_before, "the agent's spec changed");

    // Quorum back: a coordinator leads again, the node links to it, nothing was lost, writes work.
    cluster.restart(0);
    cluster.restart(1);
    let back = Instant::now();
    leader = a.start("a-3.log");
    let procs = [&leader, &follower];
    let i = a_leader(&procs, Duration::from_secs(60)).await;
    let admin = [&a, &b][i].admin();
    eventually(Duration::from_secs(60), "the node Ready on the leader", async || ready(&admin).await).await;
    eprintln!(
        "quorum back: coordinator {} leads, the node Ready on it {:.2} s later",
        ["a", "b"][i],
        back.elapsed().as_secs_f64()
    );
    assert_eq!(tenant_names(&admin).await, ["t1", "t2"]);
    let (status, body) = create(&admin, "t3").await;
    assert_eq!(status, 201, "{body}");
    assert!(agent.child.try_wait().unwrap().is_none());
    agent.kill9();
}

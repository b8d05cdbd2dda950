//! Coordinators sharing one etcd (three real members on loopback): one leads and serves, the
//! others wait; a leader killed is replaced once its lease runs out, with every acknowledged write
//! there, and agents given every coordinator's address move to the new leader with no node marked
//! Lost; a leader stopped is replaced too, and when it wakes up it cannot write, steps down (exit
//! status 75) and, started again, follows.

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

/// One coordinator's configuration and state directory, on its own loopback ports.
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
             report_interval = \"300ms\"\nunreachable_after = \"1s\"\nlost_after = \"3s\"\n\
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

    /// Its admin API (the token exists once it has led).
    fn admin(&self) -> AdminClient {
        let token = std::fs::read_to_string(self.dir.join("state/admin.token")).unwrap().trim().to_string();
        AdminClient::new(self.base(), token)
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }
}

/// True once `proc` leads and serves: it prints its addresses only then.
fn serves(proc: &Proc) -> bool {
    proc.stdout_text().contains(" admin http://")
}

/// Waits until `proc` says it waits to lead, and checks that it serves nothing meanwhile.
async fn follows(proc: &Proc, coordinator: &Coordinator) {
    eventually(Duration::from_secs(20), "a coordinator waiting to lead", async || {
        proc.log_text().contains("waiting to lead").then_some(())
    })
    .await;
    assert!(!serves(proc), "a follower serves:\n{}", proc.stdout_text());
    let admin = tokio::net::TcpStream::connect(("127.0.0.1", coordinator.admin_port)).await;
    assert!(admin.is_err(), "a follower's admin port answers");
}

/// How long after `since` the process first served (polled every 50 ms).
async fn served_after(proc: &Proc, since: Instant, within: Duration) -> Duration {
    while !serves(proc) {
        assert!(since.elapsed() < within, "no new leader within {within:?}; its log:\n{}", proc.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    since.elapsed()
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
    // One CA for all: the standbys get a copy of the first one's, as the README says to do.
    for standby in &coordinators[1..] {
        let state = standby.dir.join("state");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        for file in ["ca.crt", "ca.key"] {
            std::fs::copy(coordinators[0].dir.join("state").join(file), state.join(file)).unwrap();
        }
    }
    let mut standbys: Vec<Proc> = Vec::new();
    for (i, standby) in coordinators[1..].iter().enumerate() {
        let proc = standby.start(&format!("{}-1.log", ["b", "c"][i]));
        follows(&proc, standby).await;
        standbys.push(proc);
    }

    // Agents given every coordinator's address.
    let ca = first.stdout_text().lines().find_map(|l| l.strip_prefix("CA ").map(str::to_string)).unwrap();
    let everyone: Vec<String> = coordinators.iter().map(|c| format!("127.0.0.1:{}", c.quic_port)).collect();
    let admin = coordinators[0].admin();
    let mut agents = Vec::new();
    let names = ["n1", "n2", "n3"];
    for name in names {
        let token = admin.token("shared", "10m").await;
        agents.push(spawn_agent_to(root.path(), name, &everyone.join(","), &token, &ca));
    }
    eventually(Duration::from_secs(30), "three nodes Ready on the first leader", async || {
        let nodes = admin.nodes().await;
        (nodes.len() == 3 && nodes.iter().all(|n| n.health == Health::Ready && n.connected)).then_some(())
    })
    .await;
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
    outcome.check(&listed.iter().map(String::as_str).collect::<Vec<_>>());
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
    let (a, b) = (
        Coordinator::new(root.path(), "a", &cluster.endpoints()),
        Coordinator::new(root.path(), "b", &cluster.endpoints()),
    );
    let mut leader = a.start("a-1.log");
    eventually(Duration::from_secs(30), "the first coordinator leading", async || serves(&leader).then_some(())).await;
    let follower = b.start("b-1.log");
    follows(&follower, &b).await;
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

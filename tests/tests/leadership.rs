//! Coordinators sharing one etcd (three real members on loopback): one leads and serves, the
//! others wait; a leader killed is replaced once its lease runs out, with every acknowledged write
//! there; a leader stopped is replaced too, and when it wakes up it cannot write, steps down (exit
//! status 75) and, started again, follows.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use hexa_tests::admin::AdminClient;
use hexa_tests::etcd::{self, EtcdCluster};
use hexa_tests::procs::Proc;
use hexa_tests::{eventually, free_port};

/// The leader key's lease: a leader that has not renewed it for this long is replaced.
const LEASE_TTL: Duration = Duration::from_secs(2);

/// One coordinator's configuration and state directory, on its own loopback ports.
struct Coordinator {
    dir: PathBuf,
    config: PathBuf,
    admin_port: u16,
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
        Coordinator { dir, config, admin_port }
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
async fn a_leader_killed_in_a_burst_of_creates_is_replaced_within_its_lease_and_nothing_is_lost() {
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
    // Past a whole lease: the follower still waits while the leader keeps its lease.
    tokio::time::sleep(LEASE_TTL * 2).await;
    assert!(!serves(&follower), "the follower took over from a live leader");

    // Four clients create tenants as fast as the leader answers; it is killed after the
    // twentieth acknowledgement, whatever is in flight.
    let acked = Arc::new(Mutex::new(BTreeSet::<String>::new()));
    let in_doubt = Arc::new(Mutex::new(BTreeSet::<String>::new()));
    let admin = a.admin();
    let mut clients = Vec::new();
    for client in 0..4 {
        let (acked, in_doubt, admin) = (acked.clone(), in_doubt.clone(), admin.clone());
        clients.push(tokio::spawn(async move {
            for i in 0..50 {
                let name = format!("t{client}-{i}");
                let body = json!({"name": name, "plan": plan()});
                match admin.request_raw(reqwest::Method::POST, "/v1/tenants", Some(body)).await {
                    Ok((201, _)) => {
                        acked.lock().unwrap().insert(name);
                    }
                    Ok((status, body)) => panic!("create {name}: HTTP {status} {body}"),
                    // The leader died with this request in flight: it may or may not exist.
                    Err(_) => {
                        in_doubt.lock().unwrap().insert(name);
                        return;
                    }
                }
            }
        }));
    }
    eventually(Duration::from_secs(60), "twenty creates acknowledged", async || {
        (acked.lock().unwrap().len() >= 20).then_some(())
    })
    .await;
    leader.kill9();
    let killed = Instant::now();
    for client in clients {
        client.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let in_doubt = in_doubt.lock().unwrap().clone();

    let failover = served_after(&follower, killed, LEASE_TTL + Duration::from_secs(20)).await;
    eprintln!(
        "leader killed after {} acknowledged creates ({} in flight); the follower served {:.2} s later (lease TTL {} s)",
        acked.len(),
        in_doubt.len(),
        failover.as_secs_f64(),
        LEASE_TTL.as_secs()
    );
    let names = tenant_names(&b.admin()).await;
    let unique: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(names.len(), unique.len(), "a tenant is listed twice: {names:?}");
    for name in &acked {
        assert!(unique.contains(name.as_str()), "acknowledged tenant {name} lost in the failover");
    }
    for name in &unique {
        assert!(acked.contains(*name) || in_doubt.contains(*name), "tenant {name} exists though no create was sent");
    }
    // The new leader writes.
    let (status, body) =
        b.admin().request(reqwest::Method::POST, "/v1/tenants", Some(json!({"name": "after", "plan": plan()}))).await;
    assert_eq!(status, 201, "{body}");

    // The old one, started again, follows.
    let again = a.start("a-2.log");
    follows(&again, &a).await;
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

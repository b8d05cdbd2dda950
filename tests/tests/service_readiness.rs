//! The daemons as systemd runs them (`Type=notify`, `WatchdogSec=`): the test is the service
//! manager, with a datagram socket of its own in `NOTIFY_SOCKET`. READY=1 arrives only once the
//! daemon really serves (the coordinator: store open, QUIC and admin bound; the agent: the node's
//! isolation in force), WATCHDOG=1 pings keep coming at the rate `WATCHDOG_USEC` asks, and STATUS=
//! lines say what the daemon is doing.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hexa_agent::isolation::firewall::tenant_set_name;
use hexa_agent::state::StateDir;
use hexa_coordinator::store::Health;
use hexa_shared::isolation::{IsolationSpec, TenantIsolation};
use hexa_tests::netns::{self, Topology};
use hexa_tests::{eventually, free_port};

/// The service manager's end: the socket the daemon's notifications arrive on.
struct Manager {
    _dir: tempfile::TempDir,
    path: PathBuf,
    socket: UnixDatagram,
}

impl Manager {
    fn new() -> Manager {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        Manager { _dir: dir, path, socket }
    }

    /// The next notification (one datagram, its lines), or `None` after `within`.
    fn next(&self, within: Duration) -> Option<Vec<String>> {
        self.socket.set_read_timeout(Some(within.max(Duration::from_millis(1)))).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        match self.socket.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).lines().map(str::to_string).collect()),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => None,
            Err(e) => panic!("notify socket: {e}"),
        }
    }

    /// Every notification until one has `line` (included), or panics after `within` with what came.
    fn until(&self, line: &str, within: Duration, child: &mut Daemon) -> Vec<Vec<String>> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Some(message) = self.next(deadline.saturating_duration_since(Instant::now())) {
                let done = message.iter().any(|l| l == line);
                seen.push(message);
                if done {
                    return seen;
                }
            }
            if let Ok(Some(status)) = child.child.try_wait() {
                panic!("the daemon exited ({status}) before {line}; notifications {seen:?}\n{}", child.log());
            }
        }
        panic!("no {line} within {within:?}; notifications {seen:?}\n{}", child.log());
    }

    /// Every notification that arrives within `window`.
    fn during(&self, window: Duration) -> Vec<Vec<String>> {
        let deadline = Instant::now() + window;
        let mut seen = Vec::new();
        while let Some(message) = self.next(deadline.saturating_duration_since(Instant::now())) {
            seen.push(message);
            if Instant::now() >= deadline {
                break;
            }
        }
        seen
    }
}

fn lines_starting<'a>(messages: &'a [Vec<String>], prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    messages.iter().flatten().filter_map(move |l| l.strip_prefix(prefix))
}

fn pings(messages: &[Vec<String>]) -> usize {
    messages.iter().flatten().filter(|l| *l == "WATCHDOG=1").count()
}

/// A daemon started as systemd would start it (environment included), killed on drop.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(command: &mut Command, log: PathBuf) -> Daemon {
        let err = std::fs::File::create(&log).unwrap();
        let child = command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        Daemon { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn terminate(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn notified<'a>(command: &'a mut Command, manager: &Manager, watchdog: Duration) -> &'a mut Command {
    command.env("NOTIFY_SOCKET", &manager.path).env("WATCHDOG_USEC", watchdog.as_micros().to_string())
}

fn coordinator_command(dir: &Path, quic_port: u16, admin_port: u16) -> Command {
    let config = hexa_tests::procs::fast_coordinator_config(dir, quic_port, admin_port);
    let mut command = Command::new(hexa_tests::bin("hexa-coordinator"));
    command.arg("--config").arg(config);
    command
}

#[test]
fn the_coordinator_is_ready_once_it_serves_and_then_feeds_its_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let (quic_port, admin_port) = (free_port(), free_port());
    let manager = Manager::new();
    let mut command = coordinator_command(dir.path(), quic_port, admin_port);
    let mut daemon =
        Daemon::spawn(notified(&mut command, &manager, Duration::from_secs(1)), dir.path().join("coordinator.log"));

    let before = manager.until("READY=1", Duration::from_secs(30), &mut daemon);
    // The moment READY arrives, both listeners answer: the admin API over TCP, and the QUIC port is
    // taken (binding it again fails).
    assert!(healthz(admin_port).starts_with("HTTP/1.1 200"), "/healthz at READY: {}", healthz(admin_port));
    let taken = std::net::UdpSocket::bind(("127.0.0.1", quic_port)).unwrap_err();
    assert_eq!(taken.kind(), std::io::ErrorKind::AddrInUse, "the QUIC port is bound at READY");
    assert!(dir.path().join("state/state.redb").exists(), "the store is open at READY");
    let statuses: Vec<&str> = lines_starting(&before, "STATUS=").collect();
    assert!(statuses.iter().any(|s| s.starts_with("opening the state in")), "{statuses:?}");
    assert!(
        lines_starting(&before, "STATUS=").last().is_some_and(|s| s.contains(&format!("127.0.0.1:{quic_port}/udp"))),
        "{before:?}"
    );

    // WATCHDOG_USEC=1s: pings come several times a second, from the inventory's health loop.
    let after = manager.during(Duration::from_millis(1600));
    assert!(pings(&after) >= 4, "{after:?}");

    // Asked to stop, it says so.
    daemon.terminate();
    manager.until("STOPPING=1", Duration::from_secs(10), &mut daemon);
}

#[test]
fn a_coordinator_that_cannot_serve_never_says_ready() {
    let dir = tempfile::tempdir().unwrap();
    // The admin address is taken by someone else: the coordinator cannot serve it.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin_port = squatter.local_addr().unwrap().port();
    let manager = Manager::new();
    let mut command = coordinator_command(dir.path(), free_port(), admin_port);
    let mut daemon =
        Daemon::spawn(notified(&mut command, &manager, Duration::from_secs(1)), dir.path().join("coordinator.log"));
    let status = eventually_exits(&mut daemon, Duration::from_secs(30));
    assert!(!status.success(), "{}", daemon.log());
    assert!(daemon.log().contains(&format!("127.0.0.1:{admin_port}")), "{}", daemon.log());
    let all = manager.during(Duration::from_millis(200));
    assert!(!all.iter().flatten().any(|l| l == "READY=1"), "{all:?}");
    assert!(lines_starting(&all, "STATUS=").any(|s| s.starts_with("opening the state in")), "{all:?}");
}

/// The status line of `GET /healthz` on the admin port.
fn healthz(port: u16) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("the admin port accepts");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.lines().next().unwrap_or_default().to_string()
}

fn eventually_exits(daemon: &mut Daemon, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = daemon.child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "still running after {within:?}\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An enrolled node whose last applied spec (on disk) carries isolation, whose coordinator is gone:
/// what a node looks like to its agent at boot. Returns the agent's config file and the spec's
/// generation.
async fn enrolled_node(dir: &Path, name: &str, pod_cidr: &str, pod_ip: &str) -> (PathBuf, u64) {
    let c = hexa_tests::inproc::Coordinator::start().await;
    let agent = c.spawn_agent(name).await;
    let config = agent.config.clone();
    eventually(Duration::from_secs(20), "spec applied", async || {
        c.admin
            .node(name)
            .await
            .filter(|n| n.health == Health::Ready && n.applied_generation == Some(n.spec_generation))
    })
    .await;
    agent.stop().await;
    let state = StateDir::open(&config.state_dir).unwrap();
    let mut spec = state.load_spec().unwrap().expect("a recorded spec");
    spec.isolation = Some(IsolationSpec {
        pod_cidr: pod_cidr.parse().unwrap(),
        management_cidrs: vec!["192.0.2.0/24".parse().unwrap()],
        system_pod_ips: Default::default(),
        tenants: vec![TenantIsolation { tenant: "acme".into(), pod_ips: [pod_ip.parse().unwrap()].into() }],
        node_addresses: Default::default(),
        node_services: Vec::new(),
    });
    state.save_spec(&spec).unwrap();
    let coordinator = c.running.quic_addr;
    c.running.shutdown().await;
    // Keep the agent's state: move it out of the coordinator's temporary directory.
    let state_dir = dir.join(name);
    std::fs::rename(&config.state_dir, &state_dir).unwrap();
    let file = dir.join(format!("{name}.toml"));
    let text = format!(
        "coordinator = \"{coordinator}\"\nstate_dir = \"{}\"\nnode_name = \"{name}\"\nephemeral_path = \"{}\"\n",
        state_dir.display(),
        dir.display()
    );
    std::fs::write(&file, text).unwrap();
    (file, spec.generation)
}

fn agent_in(topology: &Topology, node: &str, config: &Path, path: Option<&str>) -> Command {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", topology.netns(node)])
        .arg(hexa_tests::bin("hexa-agent"))
        .arg("--config")
        .arg(config);
    if let Some(path) = path {
        command.env("PATH", path);
    }
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_is_ready_once_isolation_is_in_force_and_then_feeds_its_watchdog() {
    if let Some(why) = netns::unavailable(&["ip", "iptables", "ipset"]) {
        eprintln!("skipped the_agent_is_ready_once_isolation_is_in_force_and_then_feeds_its_watchdog: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let topology = Topology::builder().node("rd", "10.44.1.0/24").build().unwrap();
    let (config, generation) = enrolled_node(dir.path(), "rd-node", "10.44.0.0/16", "10.44.1.5").await;
    let saved = topology.exec("rd", &["iptables-save"]).unwrap();
    assert!(!String::from_utf8_lossy(&saved.stdout).contains("HEXA-"), "a fresh node has no chains");

    let manager = Manager::new();
    let mut command = agent_in(&topology, "rd", &config, None);
    let mut daemon =
        Daemon::spawn(notified(&mut command, &manager, Duration::from_secs(2)), dir.path().join("agent.log"));
    let before = tokio::task::block_in_place(|| manager.until("READY=1", Duration::from_secs(30), &mut daemon));

    // At READY the node's chains and the tenant's set are in force in its namespace.
    let saved = topology.exec("rd", &["iptables-save"]).unwrap();
    let saved = String::from_utf8_lossy(&saved.stdout);
    assert!(saved.lines().any(|l| l.contains("-j HEXA-")), "no jump into our chains at READY: {saved}");
    let sets = topology.exec("rd", &["ipset", "list", "-n"]).unwrap();
    assert!(String::from_utf8_lossy(&sets.stdout).lines().any(|l| l == tenant_set_name("acme")), "{sets:?}");
    // It said what it was doing first, and what is in force with READY.
    let statuses: Vec<&str> = lines_starting(&before, "STATUS=").collect();
    let enforcing = format!("enforcing the last applied isolation (generation {generation})");
    assert!(statuses.first().is_some_and(|s| *s == enforcing), "{statuses:?}");
    let ready = before.last().unwrap();
    assert!(
        ready.iter().any(|l| l.starts_with(&format!("STATUS=isolation of generation {generation} in force"))),
        "{ready:?}"
    );

    // WATCHDOG_USEC=2s: the supervisor's loop pings about every half second, coordinator or not;
    // the link says what it is doing.
    let after = tokio::task::block_in_place(|| manager.during(Duration::from_millis(2600)));
    assert!(pings(&after) >= 3, "{after:?}\n{}", daemon.log());
    let statuses: Vec<&str> = lines_starting(&before, "STATUS=").chain(lines_starting(&after, "STATUS=")).collect();
    let coordinator = std::fs::read_to_string(&config).unwrap();
    let coordinator = coordinator.lines().next().unwrap().trim_start_matches("coordinator = ").trim_matches('"');
    assert!(
        statuses.iter().any(|s| s
            .ends_with(&format!("connecting to the coordinator at {coordinator}; applied generation {generation}"))),
        "{statuses:?}"
    );

    daemon.terminate();
    tokio::task::block_in_place(|| manager.until("STOPPING=1", Duration::from_secs(10), &mut daemon));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_cannot_enforce_isolation_never_says_ready() {
    if let Some(why) = netns::unavailable(&["ip", "iptables", "ipset"]) {
        eprintln!("skipped an_agent_that_cannot_enforce_isolation_never_says_ready: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let topology = Topology::builder().node("nr", "10.45.1.0/24").build().unwrap();
    let (config, generation) = enrolled_node(dir.path(), "nr-node", "10.45.0.0/16", "10.45.1.5").await;
    // iptables-restore fails as it does when another program holds the xtables lock for good.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let wrapper = bin.join("iptables-restore");
    std::fs::write(&wrapper, "#!/bin/sh\necho 'Another app is currently holding the xtables lock.' >&2\nexit 4\n")
        .unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());

    let manager = Manager::new();
    let mut command = agent_in(&topology, "nr", &config, Some(&path));
    let mut daemon =
        Daemon::spawn(notified(&mut command, &manager, Duration::from_secs(2)), dir.path().join("agent.log"));
    let cannot = format!("STATUS=cannot enforce the last applied isolation (generation {generation})");
    let seen = tokio::task::block_in_place(|| {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        while !seen.iter().flatten().any(|l: &String| l.starts_with(&cannot)) {
            assert!(Instant::now() < deadline, "no {cannot:?}: {seen:?}\n{}", daemon.log());
            seen.extend(manager.next(Duration::from_secs(1)));
        }
        seen.extend(manager.during(Duration::from_secs(3)));
        seen
    });
    assert!(!seen.iter().flatten().any(|l| l == "READY=1"), "READY without isolation: {seen:?}");
    // Alive all the same: its loop keeps feeding the watchdog, and it says why it is not ready.
    assert!(pings(&seen) >= 3, "{seen:?}");
    assert!(lines_starting(&seen, "STATUS=").any(|s| s.contains("xtables lock")), "{seen:?}");
    assert!(daemon.child.try_wait().unwrap().is_none(), "{}", daemon.log());
}

/// The watchdog is fed from the node supervisor's loop itself, not from a timer beside it: when a
/// pass of that loop hangs (here a read of the node's `/proc/stat` that never returns, as on a
/// wedged filesystem), the pings stop, so systemd would restart the agent; when it comes back, they
/// resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_supervisor_loop_stops_the_watchdog_pings() {
    use std::sync::Arc;
    hexa_tests::init();
    let dir = tempfile::tempdir().unwrap();
    // A /proc whose `stat` is a FIFO: opening it blocks until someone writes.
    let proc_root = dir.path().join("proc");
    std::fs::create_dir(&proc_root).unwrap();
    let stat = proc_root.join("stat");
    nix::unistd::mkfifo(&stat, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();

    let manager = Manager::new();
    let service =
        Arc::new(hexa_shared::service::ServiceManager::with_socket(&manager.path, Some(Duration::from_millis(400))));
    let applier = hexa_agent::apply::Applier {
        state: StateDir::open(&dir.path().join("state")).unwrap(),
        root: dir.path().join("root"),
        systemd: Arc::new(hexa_agent::k3s::RecordingSystemd::new()),
        readiness: Arc::new(hexa_agent::k3s::ScriptedReadiness::new([Ok(false)])),
        fetcher: Arc::new(
            hexa_agent::k3s::Fetcher::new(hexa_agent::k3s::Arch::of_this_machine().unwrap(), Default::default())
                .unwrap(),
        ),
        firewall: Arc::new(hexa_agent::isolation::firewall::MemoryFirewall::new()),
        local_pods: Arc::new(hexa_agent::isolation::local_pods::CniResults::new(dir.path().join("cni"), "cni0")),
        displacements: Default::default(),
        figures: Default::default(),
    };
    let collector = hexa_agent::collector::Collector::new(hexa_agent::collector::CollectorSettings {
        proc_root,
        cgroup_root: dir.path().join("cgroup"),
        ephemeral_path: dir.path().to_path_buf(),
        reserved: Default::default(),
        eviction_memory_bytes: 0,
        max_pods: 110,
    });
    let parts = hexa_agent::node::NodeParts {
        applier,
        collector,
        pod_source: Arc::new(hexa_agent::pods::StaticPodSource::default()),
        cgroup_root: dir.path().join("cgroup"),
        governor: Default::default(),
    };
    let node =
        Arc::new(hexa_agent::node::Supervisor::spawn(parts, None, hexa_agent::node::Periods::default(), service));

    // An idle loop still comes round for the watchdog: a ping every 100 ms or so.
    let idle = tokio::task::block_in_place(|| manager.during(Duration::from_millis(800)));
    assert!(pings(&idle) >= 4, "{idle:?}");

    // A report makes the loop read /proc/stat, which hangs: the pings stop.
    let asking = node.clone();
    let report = tokio::spawn(async move { asking.report().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let wedged = tokio::task::block_in_place(|| manager.during(Duration::from_millis(1000)));
    assert_eq!(pings(&wedged), 0, "pings while the loop is stuck: {wedged:?}");
    assert!(!report.is_finished());

    // The read returns (with nothing a report can use): the loop turns again, and so do the pings.
    std::thread::spawn(move || drop(std::fs::OpenOptions::new().write(true).open(&stat)));
    let answer = tokio::time::timeout(Duration::from_secs(10), report).await.unwrap().unwrap().unwrap();
    assert!(answer.is_none(), "no report from an unreadable /proc");
    let back = tokio::task::block_in_place(|| manager.during(Duration::from_millis(800)));
    assert!(pings(&back) >= 4, "{back:?}");
}

/// A node whose spec and its copy are both damaged has no isolation of its own to put back: the
/// agent is ready once the baseline that keeps pods apart is in force, before any connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_readable_spec_the_agent_is_ready_once_the_baseline_is_in_force() {
    if let Some(why) = netns::unavailable(&["ip", "iptables", "ipset"]) {
        eprintln!("skipped with_no_readable_spec_the_agent_is_ready_once_the_baseline_is_in_force: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let topology = Topology::builder().node("bl", "10.46.1.0/24").build().unwrap();
    let (config, _) = enrolled_node(dir.path(), "bl-node", "10.46.0.0/16", "10.46.1.5").await;
    let state = dir.path().join("bl-node");
    std::fs::write(state.join("spec.json"), "{\"generation\": 4, \"trunc").unwrap();
    std::fs::write(state.join("spec.last-good.json"), "garbage").unwrap();

    let manager = Manager::new();
    let mut command = agent_in(&topology, "bl", &config, None);
    let mut daemon =
        Daemon::spawn(notified(&mut command, &manager, Duration::from_secs(2)), dir.path().join("agent.log"));
    let before = tokio::task::block_in_place(|| manager.until("READY=1", Duration::from_secs(30), &mut daemon));
    let saved = topology.exec("bl", &["iptables-save"]).unwrap();
    let saved = String::from_utf8_lossy(&saved.stdout);
    assert!(saved.lines().any(|l| l.contains("-j HEXA-")), "no baseline chains at READY: {saved}");
    let statuses: Vec<&str> = lines_starting(&before, "STATUS=").collect();
    assert!(
        statuses.iter().any(|s| s.starts_with("no readable spec: enforcing the baseline isolation")),
        "{statuses:?}"
    );
    assert!(
        statuses
            .last()
            .is_some_and(|s| s.starts_with("no readable spec: baseline isolation (pods kept apart) in force")),
        "{statuses:?}"
    );
}

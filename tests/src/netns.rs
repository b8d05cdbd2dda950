//! Small clusters made of Linux network namespaces, for tests that need real packets through real
//! iptables and ipset: "nodes" joined by a LAN, on each node a bridge with "pods" attached by veth,
//! and optionally a "management" host on the LAN.
//!
//! ```text
//!              lan (namespace with bridge br0, 192.168.100.0/24)
//!            /                 |                  \
//!   node a (.1)            node b (.2)           mgmt (.10)
//!   br0 10.42.0.1/24       br0 10.42.1.1/24
//!    |    |    |            |    |    |
//!   pods 10.42.0.x         pods 10.42.1.x
//! ```
//!
//! Nodes route to each other's pod subnets over the LAN (no overlay, like flannel's host-gw), forward
//! with `net.bridge.bridge-nf-call-iptables=1` so that same-node pod traffic meets the node's
//! `FORWARD` chain as on a Kubernetes node. The management host routes back to every pod subnet, so
//! that without a firewall every pod reaches it.
//!
//! Every interface and address lives in namespaces this module creates; the host's own network is
//! never touched. Namespace names carry the process id and a counter, so parallel tests do not
//! collide. Everything is removed on drop, also when the test panics; namespaces left by a process
//! that was killed are removed by the next topology built.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hexa_shared::isolation::Ipv4Cidr;

const NETNS_DIR: &str = "/var/run/netns";
const NAME_PREFIX: &str = "hxt";

/// Why tests that need namespaces cannot run here (not root, or a tool missing), or `None`.
pub fn unavailable(tools: &[&str]) -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root to create network namespaces".into());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for tool in tools {
        if !std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()) {
            let package = match *tool {
                "ip" => "iproute2",
                "ping" => "iputils-ping",
                "nc" => "netcat-openbsd",
                "ipset" => "ipset",
                _ => "iptables",
            };
            return Some(format!("needs `{tool}`: apt-get install -y {package}"));
        }
    }
    None
}

/// Runs a command and fails with its stderr when it does not succeed.
pub fn run(program: &str, args: &[&str]) -> Result<Output> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program} {}", args.join(" ")))?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// One node of the topology.
#[derive(Debug, Clone)]
pub struct Node {
    pub netns: String,
    pub lan_ip: Ipv4Addr,
    pub pod_subnet: Ipv4Cidr,
    /// The node's address on its pod bridge (the pods' default gateway).
    pub gateway: Ipv4Addr,
}

/// One pod: a namespace with `eth0` on its node's bridge.
#[derive(Debug, Clone)]
pub struct Pod {
    pub netns: String,
    pub node: String,
    pub ip: Ipv4Addr,
    /// The host end of its veth: its port on the node's bridge `br0`.
    pub port: String,
}

/// What a probe tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// One ICMP echo.
    Icmp,
    /// A TCP connection to this port.
    Tcp(u16),
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Probe::Icmp => f.write_str("icmp"),
            Probe::Tcp(port) => write!(f, "tcp/{port}"),
        }
    }
}

/// Describes a topology; [`TopologyBuilder::build`] creates it.
#[derive(Debug, Clone)]
pub struct TopologyBuilder {
    lan: Ipv4Cidr,
    nodes: Vec<(String, Ipv4Cidr)>,
    pods: Vec<(String, String, Ipv4Addr)>,
    management: Option<Ipv4Addr>,
    node_addresses: Vec<(String, Ipv4Addr)>,
}

impl Default for TopologyBuilder {
    fn default() -> Self {
        TopologyBuilder {
            lan: Ipv4Cidr::new(Ipv4Addr::new(192, 168, 100, 0), 24).unwrap_or(Ipv4Cidr::host(Ipv4Addr::UNSPECIFIED)),
            nodes: Vec::new(),
            pods: Vec::new(),
            management: None,
            node_addresses: Vec::new(),
        }
    }
}

impl TopologyBuilder {
    /// A node whose pods get addresses in `pod_subnet` (the node takes the first one as gateway).
    /// Nodes get LAN addresses .1, .2, ... in the order they are added.
    pub fn node(mut self, name: &str, pod_subnet: &str) -> Self {
        let subnet = pod_subnet.parse().unwrap_or_else(|e| panic!("node {name}: {e}"));
        self.nodes.push((name.to_string(), subnet));
        self
    }

    pub fn pod(mut self, node: &str, name: &str, ip: &str) -> Self {
        let ip = ip.parse().unwrap_or_else(|e| panic!("pod {name}: {ip}: {e}"));
        self.pods.push((node.to_string(), name.to_string(), ip));
        self
    }

    /// A management host (namespace `mgmt`) with this address on the LAN.
    pub fn management(mut self, ip: &str) -> Self {
        self.management = Some(ip.parse().unwrap_or_else(|e| panic!("management {ip}: {e}")));
        self
    }

    /// An extra address on the node's loopback, routed to from the other nodes and management.
    pub fn node_address(mut self, node: &str, ip: &str) -> Self {
        self.node_addresses.push((node.to_string(), ip.parse().unwrap_or_else(|e| panic!("{node} {ip}: {e}"))));
        self
    }

    pub fn build(self) -> Result<Topology> {
        remove_stale_namespaces();
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let prefix = format!("{NAME_PREFIX}{}x{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst));
        let mut topology = Topology {
            prefix,
            namespaces: Vec::new(),
            children: Vec::new(),
            nodes: BTreeMap::new(),
            pods: BTreeMap::new(),
            management: None,
        };
        // On error the partly built topology is dropped, which removes what was created.
        topology.create(&self)?;
        Ok(topology)
    }
}

/// A built topology; dropping it kills the processes it started and deletes its namespaces.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
    nodes: BTreeMap<String, Node>,
    pods: BTreeMap<String, Pod>,
    management: Option<(String, Ipv4Addr)>,
}

impl Topology {
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder::default()
    }

    fn add_netns(&mut self, role: &str) -> Result<String> {
        let name = format!("{}-{role}", self.prefix);
        run("ip", &["netns", "add", &name])?;
        self.namespaces.push(name.clone());
        run("ip", &["-n", &name, "link", "set", "lo", "up"])?;
        Ok(name)
    }

    fn create(&mut self, spec: &TopologyBuilder) -> Result<()> {
        let lan = self.add_netns("lan")?;
        ip(&lan, "link add br0 type bridge")?;
        ip(&lan, "link set br0 up")?;
        let lan_prefix = spec.lan.prefix();
        let lan_host = |n: u32| Ipv4Addr::from(u32::from(spec.lan.network()) + n);

        for (i, (name, subnet)) in spec.nodes.iter().enumerate() {
            let ns = self.add_netns(&format!("n-{name}"))?;
            for sysctl in ["net.ipv4.ip_forward=1", "net.bridge.bridge-nf-call-iptables=1"] {
                run("ip", &["netns", "exec", &ns, "sysctl", "-qw", sysctl])?;
            }
            let port = format!("n{i}");
            ip(&ns, &format!("link add lan0 type veth peer name {port} netns {lan}"))?;
            ip(&lan, &format!("link set {port} master br0 up"))?;
            let lan_ip = lan_host(i as u32 + 1);
            ip(&ns, &format!("addr add {lan_ip}/{lan_prefix} dev lan0"))?;
            ip(&ns, "link set lan0 up")?;
            let gateway = Ipv4Addr::from(u32::from(subnet.network()) + 1);
            ip(&ns, "link add br0 type bridge")?;
            ip(&ns, &format!("addr add {gateway}/{} dev br0", subnet.prefix()))?;
            ip(&ns, "link set br0 up")?;
            self.nodes.insert(name.clone(), Node { netns: ns, lan_ip, pod_subnet: *subnet, gateway });
        }
        let nodes: Vec<Node> = self.nodes.values().cloned().collect();
        for node in &nodes {
            for other in nodes.iter().filter(|o| o.netns != node.netns) {
                ip(&node.netns, &format!("route add {} via {}", other.pod_subnet, other.lan_ip))?;
            }
        }
        for (node, address) in &spec.node_addresses {
            let owner = self.nodes.get(node).with_context(|| format!("node_address: no node {node}"))?.clone();
            ip(&owner.netns, &format!("addr add {address}/32 dev lo"))?;
            for other in nodes.iter().filter(|o| o.netns != owner.netns) {
                ip(&other.netns, &format!("route add {address}/32 via {}", owner.lan_ip))?;
            }
        }

        for (i, (node, name, address)) in spec.pods.iter().enumerate() {
            if self.nodes.contains_key(name) || self.pods.contains_key(name) {
                bail!("pod name {name} is already taken");
            }
            let host = self.nodes.get(node).with_context(|| format!("pod {name}: no node {node}"))?.clone();
            if !host.pod_subnet.contains(*address) {
                bail!("pod {name}: {address} is outside node {node}'s pod subnet {}", host.pod_subnet);
            }
            let ns = self.add_netns(&format!("p-{name}"))?;
            let port = format!("v{i}");
            ip(&host.netns, &format!("link add {port} type veth peer name eth0 netns {ns}"))?;
            ip(&host.netns, &format!("link set {port} master br0 up"))?;
            ip(&ns, &format!("addr add {address}/{} dev eth0", host.pod_subnet.prefix()))?;
            ip(&ns, "link set eth0 up")?;
            ip(&ns, &format!("route add default via {}", host.gateway))?;
            self.pods.insert(name.clone(), Pod { netns: ns, node: node.clone(), ip: *address, port });
        }

        if let Some(address) = spec.management {
            let ns = self.add_netns("mgmt")?;
            ip(&ns, &format!("link add lan0 type veth peer name m0 netns {lan}"))?;
            ip(&lan, "link set m0 master br0 up")?;
            ip(&ns, &format!("addr add {address}/{lan_prefix} dev lan0"))?;
            ip(&ns, "link set lan0 up")?;
            for node in &nodes {
                ip(&ns, &format!("route add {} via {}", node.pod_subnet, node.lan_ip))?;
            }
            for (node, extra) in &spec.node_addresses {
                let owner = &self.nodes[node];
                ip(&ns, &format!("route add {extra}/32 via {}", owner.lan_ip))?;
            }
            self.management = Some((ns, address));
        }
        Ok(())
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes.get(name).unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.get(name).unwrap_or_else(|| panic!("no pod {name}"))
    }

    pub fn pods(&self) -> impl Iterator<Item = (&String, &Pod)> {
        self.pods.iter()
    }

    /// The management host's address.
    pub fn management_ip(&self) -> Ipv4Addr {
        self.management.as_ref().map(|(_, ip)| *ip).unwrap_or_else(|| panic!("the topology has no management host"))
    }

    /// The namespace of a node, a pod, or `mgmt`.
    pub fn netns(&self, name: &str) -> &str {
        if let Some(node) = self.nodes.get(name) {
            return &node.netns;
        }
        if let Some(pod) = self.pods.get(name) {
            return &pod.netns;
        }
        match &self.management {
            Some((ns, _)) if name == "mgmt" => ns,
            _ => panic!("no node, pod or management host called {name}"),
        }
    }

    /// Runs a command inside the namespace of `who`, failing on a non-zero exit.
    pub fn exec(&self, who: &str, args: &[&str]) -> Result<Output> {
        let mut all = vec!["netns", "exec", self.netns(who)];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Same as [`Topology::exec`], with stdin.
    pub fn exec_with_input(&self, who: &str, args: &[&str], input: &str) -> Result<Output> {
        use std::io::Write as _;
        let mut child = Command::new("ip")
            .args(["netns", "exec", self.netns(who)])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", args.join(" ")))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes())?;
        }
        let output = child.wait_with_output()?;
        if !output.status.success() {
            bail!("`{}` in {who} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
        }
        Ok(output)
    }

    /// Starts a TCP listener (`nc -lk`) on `port` in the namespace of `who` and waits until it accepts.
    pub fn listen_tcp(&mut self, who: &str, port: u16) -> Result<()> {
        let ns = self.netns(who).to_string();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "nc", "-dlk", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start nc")?;
        self.children.push(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.exec(who, &["nc", "-z", "-w", "1", "127.0.0.1", &port.to_string()]).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("the listener on {who}:{port} did not come up")
    }

    /// Whether `from` (a node, pod or `mgmt`) gets through to `to` with `probe`. A dropped packet
    /// takes the 2 s timeout to tell.
    pub fn reaches(&self, from: &str, to: Ipv4Addr, probe: Probe) -> bool {
        let to = to.to_string();
        let args: Vec<String> = match probe {
            Probe::Icmp => ["ping", "-n", "-q", "-c", "1", "-W", "2", &to].map(String::from).to_vec(),
            Probe::Tcp(port) => ["nc", "-z", "-w", "2", &to, &port.to_string()].map(String::from).to_vec(),
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.exec(from, &args).is_ok()
    }

    /// Runs many probes at once (16 at a time) and returns their outcomes in order.
    pub fn reaches_all(&self, probes: &[(String, Ipv4Addr, Probe)]) -> Vec<bool> {
        let mut outcomes = Vec::with_capacity(probes.len());
        for chunk in probes.chunks(16) {
            std::thread::scope(|scope| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|(from, to, probe)| scope.spawn(move || self.reaches(from, *to, *probe)))
                    .collect();
                outcomes.extend(handles.into_iter().map(|h| h.join().unwrap_or(false)));
            });
        }
        outcomes
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
    }
}

fn ip(netns: &str, args: &str) -> Result<()> {
    let mut all = vec!["-n", netns];
    all.extend(args.split_whitespace());
    run("ip", &all).map(|_| ())
}

/// Deletes namespaces named by this module for a process that no longer exists (a test run that
/// was killed before its topologies were dropped).
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NAME_PREFIX) else { continue };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let ours = rest[pid.len()..].starts_with('x');
        if ours && !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        }
    }
}

/// One empty network namespace with only `lo` up, for processes that must reach nothing but each
/// other on its loopback (a VM's user-mode network, whose host side is this loopback). Removed on
/// drop, also when the test panics.
#[derive(Debug)]
pub struct Isolated {
    pub name: String,
}

impl Isolated {
    pub fn new(role: &str) -> Result<Isolated> {
        remove_stale_namespaces();
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = format!("{NAME_PREFIX}{}x{}-{role}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst));
        run("ip", &["netns", "add", &name])?;
        let isolated = Isolated { name };
        run("ip", &["-n", &isolated.name, "link", "set", "lo", "up"])?;
        Ok(isolated)
    }

    /// Runs `body` on a new thread that has entered the namespace: sockets it opens, threads it
    /// starts (a tokio runtime's workers) and processes it spawns all live in the namespace.
    pub fn run<T: Send + 'static>(&self, body: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = format!("{NETNS_DIR}/{}", self.name);
        let file = std::fs::File::open(&path).with_context(|| format!("cannot open {path}"))?;
        let thread = std::thread::spawn(move || -> Result<T> {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns into the namespace")?;
            Ok(body())
        });
        match thread.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).stderr(Stdio::null()).status();
    }
}

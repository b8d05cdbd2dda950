//! The tenant firewall against real packets: two "nodes" (network namespaces) joined by a LAN, pods
//! of three tenants and a system pod on bridges, a management host on the LAN and a management
//! address on node a itself. Node b is a server: its Kubernetes API port is the one node service.
//! Both nodes masquerade pod traffic leaving the cluster, as flannel does, and node b has a NodePort
//! that kube-proxy would DNAT to the management host. Needs root, iproute2, iptables, ip6tables,
//! ipset, ping and nc; each test says why it skipped otherwise.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use hexa_agent::isolation::firewall::{
    self, Firewall, LocalPods, Reconciled, Recording, Ruleset, SystemFirewall, reconcile, tenant_set_name,
};
use hexa_shared::isolation::{IsolationSpec, NodeService, Protocol, TenantIsolation};
use hexa_tests::netns::{Probe, Topology, unavailable};

const TOOLS: [&str; 8] =
    ["ip", "ping", "nc", "iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore", "ipset"];
const PORT: u16 = 8080;
/// Management host on the LAN.
const MGMT_HOST: &str = "192.168.100.10";
/// An address of node a inside a management CIDR (say, its BMC-facing address).
const NODE_MGMT_ADDRESS: &str = "172.31.0.1";
const SYSTEM_POD: &str = "dns";
/// The Kubernetes API port, served by node b.
const API_PORT: u16 = 6443;
/// Node b's NodePort that leads to the management host.
const NODE_PORT: u16 = 30080;
/// The kubelet's port: a node service for system pods only.
const KUBELET_PORT: u16 = 10250;
/// The nodes' LAN addresses, as the topology gives them.
const NODE_A: &str = "192.168.100.1";
const NODE_B: &str = "192.168.100.2";

/// (pod, node, address, tenant or None for the system pod)
const PODS: [(&str, &str, &str, Option<&str>); 8] = [
    ("red-a", "a", "10.42.0.11", Some("red")),
    ("red-a2", "a", "10.42.0.14", Some("red")),
    ("green-a", "a", "10.42.0.12", Some("green")),
    ("blue-a", "a", "10.42.0.13", Some("blue")),
    (SYSTEM_POD, "a", "10.42.0.53", None),
    ("red-b", "b", "10.42.1.11", Some("red")),
    ("green-b", "b", "10.42.1.12", Some("green")),
    ("blue-b", "b", "10.42.1.13", Some("blue")),
];

fn skip(test: &str) -> bool {
    match unavailable(&TOOLS) {
        Some(why) => {
            eprintln!("skipped {test}: {why}");
            true
        }
        None => false,
    }
}

fn addr(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn tenant_of(pod: &str) -> Option<&'static str> {
    PODS.iter().find(|p| p.0 == pod).and_then(|p| p.3)
}

/// The topology, with a TCP listener in every pod, on the management host and on node a's
/// management address.
fn cluster() -> Topology {
    let mut builder = Topology::builder()
        .node("a", "10.42.0.0/24")
        .node("b", "10.42.1.0/24")
        .management(MGMT_HOST)
        .node_address("a", NODE_MGMT_ADDRESS);
    for (pod, node, ip, _) in PODS {
        builder = builder.pod(node, pod, ip);
    }
    let mut topology = builder.build().unwrap();
    for (pod, ..) in PODS {
        topology.listen_tcp(pod, PORT).unwrap();
    }
    topology.listen_tcp("mgmt", PORT).unwrap();
    topology.listen_tcp("a", PORT).unwrap();
    topology.listen_tcp("b", PORT).unwrap();
    topology.listen_tcp("b", API_PORT).unwrap();
    topology.listen_tcp("b", KUBELET_PORT).unwrap();
    for node in ["a", "b"] {
        // flannel: pod traffic leaving the pod network goes out with the node's address.
        let masquerade = "*nat\n-A POSTROUTING -s 10.42.0.0/16 ! -d 10.42.0.0/16 -j MASQUERADE\nCOMMIT\n";
        topology.exec_with_input(node, &["iptables-restore", "--noflush"], masquerade).unwrap();
    }
    // kube-proxy: a NodePort Service whose endpoint is the management host (masqueraded, as
    // kube-proxy does for traffic from outside the node).
    let node_port = format!(
        "*nat\n-A PREROUTING -d {NODE_B}/32 -p tcp --dport {NODE_PORT} -j DNAT --to-destination {MGMT_HOST}:{PORT}\n\
         -A POSTROUTING -d {MGMT_HOST}/32 -p tcp --dport {PORT} -j MASQUERADE\nCOMMIT\n"
    );
    topology.exec_with_input("b", &["iptables-restore", "--noflush"], &node_port).unwrap();
    topology
}

/// What the coordinator would send each node: both host all three tenants.
fn spec(tenants: &[&str]) -> IsolationSpec {
    IsolationSpec {
        pod_cidr: "10.42.0.0/16".parse().unwrap(),
        management_cidrs: vec![MGMT_HOST.parse().unwrap(), "172.31.0.0/24".parse().unwrap()],
        system_pod_ips: [addr("10.42.0.53")].into(),
        tenants: tenants
            .iter()
            .map(|tenant| TenantIsolation {
                tenant: tenant.to_string(),
                pod_ips: PODS.iter().filter(|p| p.3 == Some(*tenant)).map(|p| addr(p.2)).collect(),
            })
            .collect(),
        node_addresses: [addr(NODE_A), addr(NODE_B)].into(),
        node_services: vec![
            NodeService {
                name: "kube-api".into(),
                protocol: Protocol::Tcp,
                port: API_PORT,
                addresses: [addr(NODE_B)].into(),
                system_only: false,
            },
            NodeService {
                name: "kubelet".into(),
                protocol: Protocol::Tcp,
                port: KUBELET_PORT,
                addresses: [addr(NODE_A), addr(NODE_B)].into(),
                system_only: true,
            },
        ],
    }
}

/// What node `node` itself knows: its pods' bridge ports on `br0` and its pod subnet.
fn local_pods(topology: &Topology, node: &str) -> LocalPods {
    LocalPods {
        bridge: "br0".into(),
        ports: topology.pods().filter(|(_, p)| p.node == node).map(|(_, p)| (p.ip, p.port.clone())).collect(),
        pod_subnet: Some(topology.node(node).pod_subnet),
    }
}

fn reconcile_node(topology: &Topology, node: &str, spec: &IsolationSpec) -> Reconciled {
    firewall::reconcile_spec(&firewall_of(topology, node), spec, &local_pods(topology, node)).unwrap()
}

fn all_tenants() -> IsolationSpec {
    spec(&["red", "green", "blue"])
}

fn firewall_of(topology: &Topology, node: &str) -> SystemFirewall {
    SystemFirewall::in_netns(topology.netns(node))
}

fn apply_everywhere(topology: &Topology, spec: &IsolationSpec) {
    for node in ["a", "b"] {
        reconcile_node(topology, node, spec);
    }
}

/// Runs every probe and returns the ones whose outcome differs from the expectation, readably.
fn mismatches(topology: &Topology, expectations: &[(String, Ipv4Addr, Probe, bool)]) -> Vec<String> {
    let probes: Vec<(String, Ipv4Addr, Probe)> = expectations.iter().map(|(f, t, p, _)| (f.clone(), *t, *p)).collect();
    let outcomes = topology.reaches_all(&probes);
    expectations
        .iter()
        .zip(outcomes)
        .filter(|((.., want), got)| want != got)
        .map(|((from, to, probe, want), _)| {
            format!("{from} -> {to} {probe}: expected {}", if *want { "reachable" } else { "dropped" })
        })
        .collect()
}

fn both_probes(from: &str, to: Ipv4Addr, reachable: bool) -> [(String, Ipv4Addr, Probe, bool); 2] {
    [(from.to_string(), to, Probe::Icmp, reachable), (from.to_string(), to, Probe::Tcp(PORT), reachable)]
}

/// Pod to pod for every ordered pair, pods to management, nodes and management to what they reach.
fn isolation_expectations(topology: &Topology) -> Vec<(String, Ipv4Addr, Probe, bool)> {
    let mut expected = Vec::new();
    for (from, ..) in PODS {
        for (to, _, to_ip, _) in PODS {
            if from == to {
                continue;
            }
            let allowed =
                from == SYSTEM_POD || to == SYSTEM_POD || tenant_of(from).is_some() && tenant_of(from) == tenant_of(to);
            expected.extend(both_probes(from, addr(to_ip), allowed));
        }
        expected.extend(both_probes(from, topology.management_ip(), false));
        expected.extend(both_probes(from, addr(NODE_MGMT_ADDRESS), false));
        // Node addresses: their own node's, the bridge gateway, the other node's; only the API
        // port of the server passes, and the kubelet's for the system pod.
        let own = PODS.iter().find(|p| p.0 == from).map(|p| p.1).unwrap_or_default();
        expected.extend(both_probes(from, topology.node(own).gateway, false));
        expected.extend(both_probes(from, addr(NODE_A), false));
        expected.extend(both_probes(from, addr(NODE_B), false));
        expected.push((from.to_string(), addr(NODE_B), Probe::Tcp(API_PORT), true));
        expected.push((from.to_string(), addr(NODE_B), Probe::Tcp(KUBELET_PORT), from == SYSTEM_POD));
        // The NodePort leads to a management host: nobody gets there.
        expected.push((from.to_string(), addr(NODE_B), Probe::Tcp(NODE_PORT), false));
    }
    for node in ["a", "b"] {
        expected.extend(both_probes(node, topology.management_ip(), true));
        expected.extend(both_probes(node, addr(NODE_MGMT_ADDRESS), true));
        for (pod, _, ip, _) in PODS {
            if pod.ends_with("-a") || pod.ends_with("-b") {
                expected.extend(both_probes(node, addr(ip), true));
            }
        }
    }
    for (_, _, ip, _) in PODS {
        expected.extend(both_probes("mgmt", addr(ip), true));
    }
    expected
}

#[test]
fn tenants_are_isolated_across_two_nodes() {
    if skip("tenants_are_isolated_across_two_nodes") {
        return;
    }
    let topology = cluster();
    // Without the firewall everything reaches everything: the drops below are ours.
    let open: Vec<_> = isolation_expectations(&topology).into_iter().map(|(f, t, p, _)| (f, t, p, true)).collect();
    // The NodePort really leads to the management host then (masqueraded on a, DNATed on b).
    let wrong = mismatches(&topology, &open);
    assert!(wrong.is_empty(), "the topology is broken before any firewall:\n{}", wrong.join("\n"));

    // Node b alone already drops cross-tenant traffic that crosses it, in both directions.
    reconcile_node(&topology, "b", &all_tenants());
    let (red_a, red_b, green_b) = (topology.pod("red-a").ip, topology.pod("red-b").ip, topology.pod("green-b").ip);
    let only_b = [
        ("red-a".to_string(), green_b, Probe::Tcp(PORT), false),
        ("green-b".to_string(), red_a, Probe::Tcp(PORT), false),
        ("red-a".to_string(), red_b, Probe::Tcp(PORT), true),
        ("red-b".to_string(), red_a, Probe::Icmp, true),
    ];
    let wrong = mismatches(&topology, &only_b);
    assert!(wrong.is_empty(), "with only node b isolated:\n{}", wrong.join("\n"));

    apply_everywhere(&topology, &all_tenants());
    let wrong = mismatches(&topology, &isolation_expectations(&topology));
    assert!(wrong.is_empty(), "after apply:\n{}", wrong.join("\n"));
}

/// Deletes, on `node`, the rule of ours that mentions `needle`, as an admin would by hand.
fn delete_rule_by_hand(topology: &Topology, node: &str, needle: &str) {
    let save = String::from_utf8(topology.exec(node, &["iptables-save", "-t", "mangle"]).unwrap().stdout).unwrap();
    let line = save.lines().find(|l| l.starts_with("-A ") && l.contains(needle)).unwrap();
    let input = format!("*mangle\n{}\nCOMMIT\n", line.replacen("-A ", "-D ", 1));
    topology.exec_with_input(node, &["iptables-restore", "--noflush"], &input).unwrap();
}

/// Reconciles `node` and checks the drift it repaired; returns whether it was a displacement.
fn assert_repaired(topology: &Topology, node: &str, mentions: &str) -> bool {
    match reconcile_node(topology, node, &all_tenants()) {
        Reconciled::Applied { drift, displaced } => {
            assert!(drift.to_string().contains(mentions), "{drift}");
            displaced
        }
        Reconciled::Unchanged => panic!("the reconcile on {node} found no drift, expected {mentions}"),
    }
}

#[test]
fn hand_made_changes_are_undone_by_the_next_reconcile() {
    if skip("hand_made_changes_are_undone_by_the_next_reconcile") {
        return;
    }
    let topology = cluster();
    apply_everywhere(&topology, &all_tenants());
    let red_b = topology.pod("red-b").ip;
    let red_a = topology.pod("red-a").ip;
    let green_a = topology.pod("green-a").ip;
    assert!(topology.reaches("red-a", red_b, Probe::Tcp(PORT)));

    // Our rule for red on node a goes: red's cross-node traffic is dropped there.
    delete_rule_by_hand(&topology, "a", "tenant red");
    assert!(!topology.reaches("red-a", red_b, Probe::Tcp(PORT)), "the deleted rule did not matter");
    assert!(!assert_repaired(&topology, "a", "chain mangle HEXA-POD: rules 1 missing"));
    assert!(topology.reaches("red-a", red_b, Probe::Tcp(PORT)));
    assert!(topology.reaches("red-a", red_b, Probe::Icmp));

    // A member of red's set goes on node b.
    let red_set = tenant_set_name("red");
    topology.exec("b", &["ipset", "del", &red_set, &red_b.to_string()]).unwrap();
    assert!(!topology.reaches("red-b", red_a, Probe::Icmp), "the deleted member did not matter");
    assert_repaired(&topology, "b", &format!("set {red_set}: members 1 missing ({red_b})"));
    assert!(topology.reaches("red-b", red_a, Probe::Icmp));

    // The jump from FORWARD goes: isolation is off on node a until the reconcile.
    delete_rule_by_hand(&topology, "a", "-A FORWARD -j HEXA-FWD");
    assert!(topology.reaches("red-a", green_a, Probe::Icmp), "isolation held without the jump");
    assert!(assert_repaired(&topology, "a", "jump mangle FORWARD -j HEXA-FWD not rule 1"), "a displacement");
    assert!(!topology.reaches("red-a", green_a, Probe::Icmp));

    // kube-router's network-policy controller puts an ACCEPT first in filter's FORWARD: our DROP in
    // mangle is final anyway, and there is nothing to repair.
    for node in ["a", "b"] {
        let input = "*filter\n-I FORWARD 1 -j ACCEPT\n-I INPUT 1 -j ACCEPT\nCOMMIT\n";
        topology.exec_with_input(node, &["iptables-restore", "--noflush"], input).unwrap();
    }
    let green_b = topology.pod("green-b").ip;
    for (from, to) in [("red-a", green_a), ("red-a", green_b), ("green-b", red_a)] {
        assert!(!topology.reaches(from, to, Probe::Tcp(PORT)), "{from} -> {to} passed behind filter's ACCEPT");
        assert!(!topology.reaches(from, to, Probe::Icmp), "{from} -> {to} passed behind filter's ACCEPT");
    }
    assert!(topology.reaches("red-a", red_b, Probe::Tcp(PORT)));
    assert_eq!(reconcile_node(&topology, "a", &all_tenants()), Reconciled::Unchanged);

    // The same ACCEPT first in mangle's FORWARD: isolation is off until the reconcile, which moves
    // our jump back to the top and counts a displacement.
    let input = "*mangle\n-I FORWARD 1 -j ACCEPT\nCOMMIT\n";
    topology.exec_with_input("a", &["iptables-restore", "--noflush"], input).unwrap();
    assert!(topology.reaches("red-a", green_a, Probe::Icmp), "isolation held behind a mangle ACCEPT");
    assert!(assert_repaired(&topology, "a", "unexpected jump mangle FORWARD -j HEXA-FWD at rule 2"));
    assert!(!topology.reaches("red-a", green_a, Probe::Icmp));
    let save = String::from_utf8(topology.exec("a", &["iptables-save", "-t", "mangle"]).unwrap().stdout).unwrap();
    let forward: Vec<&str> = save.lines().filter(|l| l.starts_with("-A FORWARD")).collect();
    assert_eq!(forward, ["-A FORWARD -j HEXA-FWD", "-A FORWARD -j ACCEPT"], "the foreign rule must stay");
}

#[test]
fn a_reconcile_without_drift_writes_nothing() {
    if skip("a_reconcile_without_drift_writes_nothing") {
        return;
    }
    let topology = cluster();
    let desired = Ruleset::desired(&all_tenants(), &local_pods(&topology, "a")).unwrap();
    let recording = Recording::new(firewall_of(&topology, "a"));
    assert!(matches!(reconcile(&recording, &desired).unwrap(), Reconciled::Applied { .. }));
    assert_eq!(recording.writes().len(), 1);
    let before = state_text(&topology, "a");
    for _ in 0..3 {
        assert_eq!(reconcile(&recording, &desired).unwrap(), Reconciled::Unchanged);
    }
    assert_eq!(recording.writes().len(), 1, "a reconcile without drift ran iptables-restore or ipset restore");
    assert_eq!(state_text(&topology, "a"), before);
    // What the kernel prints reads back as exactly what we asked for.
    assert_eq!(recording.inner().current().unwrap(), desired);
}

/// `iptables-save` without its comment lines, and `ipset save`, of our namespace.
fn state_text(topology: &Topology, node: &str) -> (Vec<String>, Vec<String>) {
    let save = String::from_utf8(topology.exec(node, &["iptables-save", "-t", "mangle"]).unwrap().stdout).unwrap();
    let sets = String::from_utf8(topology.exec(node, &["ipset", "save"]).unwrap().stdout).unwrap();
    let lines = |s: &str| s.lines().filter(|l| !l.starts_with('#')).map(str::to_string).collect::<Vec<_>>();
    (lines(&save), lines(&sets))
}

fn only_in(a: &[String], b: &[String]) -> Vec<String> {
    let b: BTreeSet<&String> = b.iter().collect();
    a.iter().filter(|l| !b.contains(l)).cloned().collect()
}

#[test]
fn removing_a_tenant_removes_exactly_its_rule_and_set() {
    if skip("removing_a_tenant_removes_exactly_its_rule_and_set") {
        return;
    }
    let topology = cluster();
    apply_everywhere(&topology, &all_tenants());
    let (rules_before, sets_before) = state_text(&topology, "b");

    let blue_set = tenant_set_name("blue");
    let outcome = reconcile_node(&topology, "b", &spec(&["red", "green"]));
    assert!(matches!(outcome, Reconciled::Applied { .. }));
    let (rules_after, sets_after) = state_text(&topology, "b");

    let gone = only_in(&rules_before, &rules_after);
    assert_eq!(gone.len(), 1, "{gone:#?}");
    assert!(gone[0].starts_with("-A HEXA-POD") && gone[0].contains(&blue_set), "{gone:#?}");
    assert_eq!(only_in(&rules_after, &rules_before), Vec::<String>::new());
    let sets_gone = only_in(&sets_before, &sets_after);
    assert_eq!(sets_gone.len(), 3, "the create line and blue's two members: {sets_gone:#?}");
    assert!(sets_gone.iter().all(|l| l.split_whitespace().nth(1) == Some(blue_set.as_str())), "{sets_gone:#?}");
    assert_eq!(only_in(&sets_after, &sets_before), Vec::<String>::new());
    let names = String::from_utf8(topology.exec("b", &["ipset", "list", "-n"]).unwrap().stdout).unwrap();
    assert!(!names.contains(&blue_set), "{names}");

    // The other tenants are as isolated as before; blue's pod on b is now unknown there.
    let red_a = topology.pod("red-a").ip;
    assert!(topology.reaches("red-b", red_a, Probe::Tcp(PORT)));
    assert!(!topology.reaches("red-b", topology.pod("green-a").ip, Probe::Tcp(PORT)));
    assert!(!topology.reaches("blue-b", topology.pod("blue-a").ip, Probe::Tcp(PORT)));

    // Tearing down leaves no chain, jump or set of ours, and the node is open again.
    assert!(matches!(firewall::teardown(&firewall_of(&topology, "b")).unwrap(), Reconciled::Applied { .. }));
    let (rules, sets) = state_text(&topology, "b");
    assert!(rules.iter().all(|l| !l.contains("HEXA-")), "{rules:#?}");
    assert!(sets.iter().all(|l| !l.contains(" hx-")), "{sets:#?}");
    assert!(topology.reaches("red-b", topology.pod("green-b").ip, Probe::Icmp));
}

#[test]
fn the_legacy_backend_converges_too() {
    if skip("the_legacy_backend_converges_too") {
        return;
    }
    if let Some(why) = unavailable(&["iptables-legacy-save", "iptables-legacy-restore"]) {
        eprintln!("skipped the_legacy_backend_converges_too: {why}");
        return;
    }
    let topology = Topology::builder().node("solo", "10.42.0.0/24").build().unwrap();
    let firewall = Recording::new(firewall_of(&topology, "solo").with_iptables("iptables-legacy"));
    let desired = Ruleset::desired(&all_tenants(), &local_pods(&topology, "solo")).unwrap();
    assert!(matches!(reconcile(&firewall, &desired).unwrap(), Reconciled::Applied { .. }));
    assert_eq!(reconcile(&firewall, &desired).unwrap(), Reconciled::Unchanged);
    assert_eq!(firewall.writes().len(), 1);
    assert!(matches!(firewall::teardown(&firewall).unwrap(), Reconciled::Applied { .. }));
    assert_eq!(firewall.inner().current().unwrap(), Ruleset::default());
}

/// Adds a counter for UDP packets to `port` from `source` in `who`'s raw table (before any other
/// table sees them), so a one-way packet's arrival can be told.
fn count_udp(topology: &Topology, who: &str, source: Ipv4Addr, port: u16) {
    let input = format!("*raw\n-A PREROUTING -s {source}/32 -p udp -m udp --dport {port}\nCOMMIT\n");
    topology.exec_with_input(who, &["iptables-restore", "--noflush"], &input).unwrap();
}

fn udp_arrivals(topology: &Topology, who: &str, source: Ipv4Addr, port: u16) -> u64 {
    let save = String::from_utf8(topology.exec(who, &["iptables-save", "-c", "-t", "raw"]).unwrap().stdout).unwrap();
    let rule = format!("-A PREROUTING -s {source}/32 -p udp -m udp --dport {port}");
    let line = save.lines().find(|l| l.ends_with(&rule)).unwrap_or_else(|| panic!("no counter in {who}: {save}"));
    line.trim_start_matches('[').split(':').next().unwrap().parse().unwrap()
}

/// Sends one UDP datagram from `who` with `source` (an address of `who`) to `to:port`.
fn send_udp(topology: &Topology, who: &str, source: Ipv4Addr, to: Ipv4Addr, port: u16) {
    let (source, to, port) = (source.to_string(), to.to_string(), port.to_string());
    topology.exec_with_input(who, &["nc", "-u", "-w", "1", "-s", &source, &to, &port], "x\n").unwrap();
}

/// The pod's IPv6 link-local address on eth0, once duplicate address detection is done.
fn link_local(topology: &Topology, pod: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = topology.exec(pod, &["ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"]).unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        if let Some(address) = text.split_whitespace().skip_while(|w| *w != "inet6").nth(1)
            && !text.contains("tentative")
        {
            return address.split('/').next().unwrap().to_string();
        }
        assert!(std::time::Instant::now() < deadline, "{pod} has no link-local address: {text}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn pings6(topology: &Topology, from: &str, to: &str) -> bool {
    topology.exec(from, &["ping", "-6", "-n", "-q", "-c", "1", "-W", "2", &format!("{to}%eth0")]).is_ok()
}

#[test]
fn ways_around_the_firewall_are_closed() {
    if skip("ways_around_the_firewall_are_closed") {
        return;
    }
    let topology = cluster();
    let (red_a, red_a2, green_a, green_b) =
        (topology.pod("red-a").ip, topology.pod("red-a2").ip, topology.pod("green-a").ip, topology.pod("green-b").ip);
    const VXLAN: u16 = 8472;
    const PROBE_PORT: u16 = 9999;

    // Before the firewall each of these gets through: the drops after it are ours.
    let green_link_local = link_local(&topology, "green-a");
    link_local(&topology, "red-a");
    assert!(pings6(&topology, "red-a", &green_link_local), "IPv6 link-local does not work on the bridge");
    // (Node a masquerades it: it arrives from node a's address.)
    count_udp(&topology, "b", addr(NODE_A), VXLAN);
    send_udp(&topology, "red-a", red_a, addr(NODE_B), VXLAN);
    assert_eq!(udp_arrivals(&topology, "b", addr(NODE_A), VXLAN), 1, "the VXLAN probe never reached node b");
    // red-a takes green-a's address as its own to pass as green towards green-b...
    topology.exec("red-a", &["ip", "addr", "add", &format!("{green_a}/32"), "dev", "eth0", "nodad"]).unwrap();
    count_udp(&topology, "green-b", green_a, PROBE_PORT);
    send_udp(&topology, "red-a", green_a, green_b, PROBE_PORT);
    assert_eq!(udp_arrivals(&topology, "green-b", green_a, PROBE_PORT), 1, "the spoofed probe never arrived");
    // ...and a host on the LAN sends as red-a, as a forged overlay packet would, to red's other pod.
    topology.exec("mgmt", &["ip", "addr", "add", &format!("{red_a}/32"), "dev", "lo"]).unwrap();
    count_udp(&topology, "red-a2", red_a, PROBE_PORT);
    send_udp(&topology, "mgmt", red_a, red_a2, PROBE_PORT);
    assert_eq!(udp_arrivals(&topology, "red-a2", red_a, PROBE_PORT), 1, "the forged probe never arrived");

    apply_everywhere(&topology, &all_tenants());
    assert!(!pings6(&topology, "red-a", &green_link_local), "IPv6 between two tenants on one bridge");
    send_udp(&topology, "red-a", red_a, addr(NODE_B), VXLAN);
    assert_eq!(udp_arrivals(&topology, "b", addr(NODE_A), VXLAN), 1, "a pod reached node b's VXLAN port");
    send_udp(&topology, "red-a", green_a, green_b, PROBE_PORT);
    assert_eq!(udp_arrivals(&topology, "green-b", green_a, PROBE_PORT), 1, "a spoofed source passed");
    send_udp(&topology, "mgmt", red_a, red_a2, PROBE_PORT);
    assert_eq!(udp_arrivals(&topology, "red-a2", red_a, PROBE_PORT), 1, "a forged local pod source passed");
    // The pods' own traffic still flows.
    assert!(topology.reaches("red-a", red_a2, Probe::Tcp(PORT)));
    assert!(topology.reaches("red-a", topology.pod("red-b").ip, Probe::Tcp(PORT)));
}

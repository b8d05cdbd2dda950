use std::net::Ipv4Addr;

use hexa_shared::isolation::{IsolationSpec, NodeService, Protocol, TenantIsolation};
use proptest::prelude::*;

use super::*;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn tenant(name: &str, ips: &[&str]) -> TenantIsolation {
    TenantIsolation { tenant: name.into(), pod_ips: ips.iter().map(|s| ip(s)).collect() }
}

fn small_spec() -> IsolationSpec {
    IsolationSpec {
        pod_cidr: "10.42.0.0/16".parse().unwrap(),
        management_cidrs: vec!["192.168.100.10".parse().unwrap(), "172.31.0.0/24".parse().unwrap()],
        system_pod_ips: [ip("10.42.0.53")].into(),
        tenants: vec![tenant("globex", &["10.42.0.12", "10.42.1.12"]), tenant("acme", &["10.42.0.11", "10.42.1.11"])],
        node_addresses: [ip("192.168.100.1"), ip("192.168.100.2")].into(),
        node_services: vec![
            NodeService {
                name: "kube-api".into(),
                protocol: Protocol::Tcp,
                port: 6443,
                addresses: [ip("192.168.100.1")].into(),
                system_only: false,
            },
            NodeService {
                name: "kubelet".into(),
                protocol: Protocol::Tcp,
                port: 10250,
                addresses: [ip("192.168.100.1"), ip("192.168.100.2")].into(),
                system_only: true,
            },
        ],
    }
}

/// Node a of the small spec: two pods of its own on `cni0`.
fn local() -> LocalPods {
    LocalPods {
        bridge: "cni0".into(),
        ports: [(ip("10.42.0.11"), "veth11".to_string()), (ip("10.42.0.12"), "veth12".to_string())].into(),
        pod_subnet: Some("10.42.0.0/24".parse().unwrap()),
    }
}

fn without(spec: &IsolationSpec, gone: &str) -> IsolationSpec {
    IsolationSpec { tenants: spec.tenants.iter().filter(|t| t.tenant != gone).cloned().collect(), ..spec.clone() }
}

/// A memory firewall that already has someone else's rules, as on a K3s node.
fn node_with_foreign_rules() -> MemoryFirewall {
    let fw = MemoryFirewall::new();
    fw.exec_iptables(
        "*filter\n:KUBE-FORWARD - [0:0]\n-A FORWARD -j KUBE-FORWARD\n-A FORWARD -s 10.42.0.0/16 -j ACCEPT\n\
         -A INPUT -j KUBE-FIREWALL\n-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\nCOMMIT\n\
         *mangle\n-A FORWARD -j MARK --set-xmark 0x4000/0x4000\nCOMMIT\n",
    )
    .unwrap();
    fw.exec_ipset("create KUBE-SRC-ABC hash:ip family inet\nadd KUBE-SRC-ABC 10.42.0.99\n").unwrap();
    fw
}

/// The lines of one table in a save.
fn table<'a>(save: &'a str, name: &str) -> Vec<&'a str> {
    let start = format!("*{name}");
    save.lines().skip_while(|l| *l != start).take_while(|l| *l != "COMMIT").collect()
}

fn foreign_lines(save: &str) -> Vec<String> {
    save.lines().filter(|l| l.starts_with("-A ") && !l.contains(CHAIN_PREFIX)).map(str::to_string).collect()
}

#[test]
fn tenant_set_names_fit_ipset_and_are_stable() {
    assert_eq!(tenant_set_name("acme"), "hx-t-acme-83f4f6de0f");
    let longest = "a".repeat(hexa_shared::names::MAX_TENANT_NAME);
    for name in ["acme", "a", "a-b-c-d-e-f-g", &longest, "tenant-with-dash-at-10"] {
        let set = tenant_set_name(name);
        assert!(set.len() + NEW_SUFFIX.len() <= MAX_SET_NAME, "{set} is too long");
        assert!(set.starts_with("hx-t-") && !set.contains("--"), "{set}");
    }
    // Same first ten characters, different tenants: the hash tells them apart.
    assert_ne!(tenant_set_name("customer-0001"), tenant_set_name("customer-0002"));
}

#[test]
fn rules_are_normalised_to_iptables_save_spelling() {
    let cases = [
        ("-s 10.42.0.0/16 -d 192.168.5.1 -j DROP", "-s 10.42.0.0/16 -d 192.168.5.1/32 -j DROP"),
        ("--source 10.1.0.0/16 --destination 10.2.0.0/16 --jump HEXA-POD", "-s 10.1.0.0/16 -d 10.2.0.0/16 -j HEXA-POD"),
        ("-p 6 -j DROP", "-p tcp -j DROP"),
        ("-p UDP -j DROP", "-p udp -j DROP"),
        (
            "-m conntrack --ctstate ESTABLISHED,RELATED -j RETURN",
            "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        ),
        ("-m state --state established,new,invalid", "-m state --state INVALID,NEW,ESTABLISHED"),
        ("-m comment --comment tenant:acme -j RETURN", "-m comment --comment tenant:acme -j RETURN"),
        ("-m comment --comment \"tenant acme\"  -j RETURN", "-m comment --comment \"tenant acme\" -j RETURN"),
        ("-m comment --comment \"say \\\"hi\\\"\" -j RETURN", "-m comment --comment \"say \\\"hi\\\"\" -j RETURN"),
        ("! -s 10.0.0.1 -j DROP", "! -s 10.0.0.1/32 -j DROP"),
    ];
    for (input, want) in cases {
        assert_eq!(normalize_rule(input), want, "{input}");
        assert_eq!(normalize_rule(want), want, "not idempotent: {want}");
    }
}

#[test]
fn full_batch_for_a_small_spec() {
    let batch = render(&Ruleset::desired(&small_spec(), &local()).unwrap());
    insta::assert_snapshot!("full_batch", batch.to_string());
}

#[test]
fn rule_count_grows_with_tenants_not_pods() {
    let few = small_spec();
    let mut many = small_spec();
    for (i, t) in many.tenants.iter_mut().enumerate() {
        t.pod_ips.extend((0..1000u32).map(|n| Ipv4Addr::from(u32::from(ip("10.42.10.0")) + 1000 * i as u32 + n)));
    }
    let few_rules = Ruleset::desired(&few, &local()).unwrap();
    let many_rules = Ruleset::desired(&many, &local()).unwrap();
    assert_eq!(few_rules.rule_count(), many_rules.rule_count());
    assert_eq!(many_rules.member_count(), few_rules.member_count() + 2000);
    let mut more = few.clone();
    more.tenants.push(tenant("initech", &["10.42.0.13"]));
    assert_eq!(Ruleset::desired(&more, &local()).unwrap().rule_count(), few_rules.rule_count() + 1);
}

#[test]
fn an_invalid_spec_is_refused_before_anything_is_written() {
    let mut spec = small_spec();
    spec.tenants.push(tenant("initech", &["10.42.0.11"]));
    let fw = Recording::new(MemoryFirewall::new());
    let err = reconcile_spec(&fw, &spec, &local()).unwrap_err().to_string();
    assert!(err.contains("10.42.0.11 is in both tenant \"acme\" and tenant \"initech\""), "{err}");
    assert!(fw.writes().is_empty());
}

#[test]
fn reading_back_real_iptables_save_output_finds_no_drift() {
    // As iptables-save v1.8.9 (nf_tables), ip6tables-save and ipset v7.17 print the state of
    // `small_spec` on node a, with foreign rules around ours (kube-router's ACCEPT first in filter).
    let iptables_save = r#"# Generated by iptables-save v1.8.9 (nf_tables) on Tue Dec  1 14:36:49 2026
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:HEXA-FWD - [0:0]
:HEXA-IN - [0:0]
:HEXA-NODE - [0:0]
:HEXA-POD - [0:0]
:HEXA-SPOOF - [0:0]
-A INPUT -j HEXA-IN
-A FORWARD -j HEXA-FWD
-A FORWARD -j MARK --set-xmark 0x4000/0x4000
-A HEXA-FWD -i cni0 -j HEXA-SPOOF
-A HEXA-FWD -s 10.42.0.0/24 ! -i cni0 -m comment --comment "spoofed local pod address" -j DROP
-A HEXA-FWD -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
-A HEXA-FWD -s 10.42.0.0/16 -d 192.168.100.10/32 -j DROP
-A HEXA-FWD -s 10.42.0.0/16 -d 172.31.0.0/24 -j DROP
-A HEXA-FWD -s 10.42.0.0/16 -m set --match-set hx-nodes dst -j HEXA-NODE
-A HEXA-FWD -s 10.42.0.0/16 -d 10.42.0.0/16 -j HEXA-POD
-A HEXA-IN -i cni0 -j HEXA-SPOOF
-A HEXA-IN -s 10.42.0.0/24 ! -i cni0 -m comment --comment "spoofed local pod address" -j DROP
-A HEXA-IN -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
-A HEXA-IN -s 10.42.0.0/16 -d 192.168.100.10/32 -j DROP
-A HEXA-IN -s 10.42.0.0/16 -d 172.31.0.0/24 -j DROP
-A HEXA-IN -s 10.42.0.0/16 -j HEXA-NODE
-A HEXA-NODE -p tcp -m set --match-set hx-s-kube-api dst -m tcp --dport 6443 -m comment --comment "service kube-api" -j RETURN
-A HEXA-NODE -p tcp -m set --match-set hx-sys src -m set --match-set hx-s-kubelet dst -m tcp --dport 10250 -m comment --comment "service kubelet" -j RETURN
-A HEXA-NODE -m comment --comment "pods to node addresses" -j DROP
-A HEXA-POD -m set --match-set hx-sys src -j RETURN
-A HEXA-POD -m set --match-set hx-sys dst -j RETURN
-A HEXA-POD -m set --match-set hx-t-acme-83f4f6de0f src -m set --match-set hx-t-acme-83f4f6de0f dst -m comment --comment "tenant acme" -j RETURN
-A HEXA-POD -m set --match-set hx-t-globex-57b54bb22e src -m set --match-set hx-t-globex-57b54bb22e dst -m comment --comment "tenant globex" -j RETURN
-A HEXA-POD -m comment --comment "pods of different tenants" -j DROP
-A HEXA-SPOOF -s 10.42.0.11/32 -m physdev --physdev-in veth11 -j RETURN
-A HEXA-SPOOF -s 10.42.0.12/32 -m physdev --physdev-in veth12 -j RETURN
-A HEXA-SPOOF -m comment --comment "spoofed pod source" -j DROP
COMMIT
# Completed on Tue Dec  1 14:36:49 2026
# Generated by iptables-save v1.8.9 (nf_tables) on Tue Dec  1 14:36:49 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-ROUTER-FORWARD - [0:0]
-A FORWARD -j KUBE-ROUTER-FORWARD
-A KUBE-ROUTER-FORWARD -j ACCEPT
COMMIT
"#;
    let ip6tables_save = r#"# Generated by ip6tables-save v1.8.9 (nf_tables) on Tue Dec  1 14:36:49 2026
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:HEXA-FWD - [0:0]
:HEXA-IN - [0:0]
-A INPUT -j HEXA-IN
-A FORWARD -j HEXA-FWD
-A HEXA-FWD -i cni0 -m comment --comment "pods have no IPv6" -j DROP
-A HEXA-IN -i cni0 -m comment --comment "pods have no IPv6" -j DROP
COMMIT
"#;
    let ipset_save = "create KUBE-SRC-X hash:ip family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x1\n\
add KUBE-SRC-X 10.42.0.99\n\
create hx-nodes hash:ip family inet hashsize 1024 maxelem 1048576 bucketsize 12 initval 0x316c7ae2\n\
add hx-nodes 192.168.100.1\n\
add hx-nodes 192.168.100.2\n\
create hx-s-kube-api hash:ip family inet hashsize 1024 maxelem 1048576 bucketsize 12 initval 0x5e41ddc1\n\
add hx-s-kube-api 192.168.100.1\n\
create hx-s-kubelet hash:ip family inet hashsize 1024 maxelem 1048576 bucketsize 12 initval 0x5e41ddc2\n\
add hx-s-kubelet 192.168.100.2\n\
add hx-s-kubelet 192.168.100.1\n\
create hx-sys hash:ip family inet hashsize 1024 maxelem 1048576 bucketsize 12 initval 0x71c59cf5\n\
add hx-sys 10.42.0.53\n\
create hx-t-acme-83f4f6de0f hash:ip family inet hashsize 1024 maxelem 1048576 bucketsize 12 initval 0x2\n\
add hx-t-acme-83f4f6de0f 10.42.1.11\n\
add hx-t-acme-83f4f6de0f 10.42.0.11\n\
create hx-t-globex-57b54bb22e hash:ip family inet hashsize 1024 maxelem 1048576 bucketsize 12 initval 0x3\n\
add hx-t-globex-57b54bb22e 10.42.0.12\n\
add hx-t-globex-57b54bb22e 10.42.1.12\n";
    let desired = Ruleset::desired(&small_spec(), &local()).unwrap();
    assert_eq!(tenant_set_name("globex"), "hx-t-globex-57b54bb22e");
    let current = Ruleset::from_saves(iptables_save, ip6tables_save, ipset_save).unwrap();
    assert_eq!(drift(&desired, &current), Drift::default());
    assert_eq!(plan(&desired, &current), None);
}

#[test]
fn unknown_lines_are_reported_not_ignored() {
    let err = Ruleset::from_saves("*mangle\n-Z FORWARD\nCOMMIT\n", "", "").unwrap_err().to_string();
    assert!(err.contains("-Z FORWARD"), "{err}");
    let err = Ruleset::from_saves("", "", "add hx-sys 10.0.0.1\n").unwrap_err().to_string();
    assert!(err.contains("not created before"), "{err}");
}

#[test]
fn a_reconcile_without_drift_writes_nothing() {
    let fw = Recording::new(node_with_foreign_rules());
    let desired = Ruleset::desired(&small_spec(), &local()).unwrap();
    assert!(matches!(reconcile(&fw, &desired).unwrap(), Reconciled::Applied { .. }));
    assert_eq!(fw.writes().len(), 1);
    for _ in 0..3 {
        assert_eq!(reconcile(&fw, &desired).unwrap(), Reconciled::Unchanged);
    }
    assert_eq!(fw.writes().len(), 1, "a reconcile without drift wrote something");
}

#[test]
fn our_jumps_come_first_and_foreign_rules_are_left_alone() {
    let fw = node_with_foreign_rules();
    let before = foreign_lines(&fw.iptables_save());
    reconcile_spec(&fw, &small_spec(), &local()).unwrap();
    let save = fw.iptables_save();
    let rules = |table_name: &str, chain: &str| -> Vec<String> {
        table(&save, table_name)
            .into_iter()
            .filter(|l| l.starts_with(&format!("-A {chain} ")))
            .map(String::from)
            .collect()
    };
    assert_eq!(rules("mangle", "FORWARD"), ["-A FORWARD -j HEXA-FWD", "-A FORWARD -j MARK --set-xmark 0x4000/0x4000"]);
    assert_eq!(rules("mangle", "INPUT"), ["-A INPUT -j HEXA-IN"]);
    assert_eq!(rules("filter", "FORWARD"), ["-A FORWARD -j KUBE-FORWARD", "-A FORWARD -s 10.42.0.0/16 -j ACCEPT"]);
    assert_eq!(foreign_lines(&save), before);
    assert!(fw.ipset_save().contains("add KUBE-SRC-ABC 10.42.0.99"));
    let ip6 = fw.ip6tables_save();
    assert_eq!(table(&ip6, "mangle").iter().filter(|l| l.starts_with("-A FORWARD")).count(), 1, "{ip6}");

    // kube-router puts itself first in filter: that changes nothing for us, our DROP comes before.
    fw.exec_iptables("*filter\n:KUBE-ROUTER-FORWARD - [0:0]\n-I FORWARD 1 -j KUBE-ROUTER-FORWARD\nCOMMIT\n").unwrap();
    let fw = Recording::new(fw);
    assert_eq!(reconcile_spec(&fw, &small_spec(), &local()).unwrap(), Reconciled::Unchanged);
    // A program that puts itself first in mangle displaces us: the reconcile moves our jumps back
    // in front, only that, and says it was a displacement.
    fw.inner().exec_iptables("*mangle\n-I FORWARD 1 -j RETURN\nCOMMIT\n").unwrap();
    let Reconciled::Applied { drift, displaced } = reconcile_spec(&fw, &small_spec(), &local()).unwrap() else {
        panic!("no drift found")
    };
    assert!(displaced);
    assert_eq!(
        drift.to_string(),
        "jump mangle FORWARD -j HEXA-FWD not rule 1; unexpected jump mangle FORWARD -j HEXA-FWD at rule 2"
    );
    let writes = fw.writes();
    assert_eq!(
        writes[0].iptables,
        "*mangle\n-D FORWARD -j HEXA-FWD\n-D INPUT -j HEXA-IN\n-I FORWARD 1 -j HEXA-FWD\n-I INPUT 1 -j HEXA-IN\nCOMMIT\n"
    );
    assert!(writes[0].ipset_prepare.is_empty() && writes[0].ipset_cleanup.is_empty() && writes[0].ip6tables.is_empty());
    let save = fw.inner().iptables_save();
    assert!(save.contains("-A FORWARD -j HEXA-FWD\n-A FORWARD -j RETURN\n"), "{save}");
    // A new tenant is a change of ours, not a displacement.
    let mut more = small_spec();
    more.tenants.push(tenant("initech", &["10.42.0.13"]));
    assert!(matches!(reconcile_spec(&fw, &more, &local()).unwrap(), Reconciled::Applied { displaced: false, .. }));
}

#[test]
fn hand_made_drift_is_repaired_by_rebuilding_only_what_differs() {
    let fw = node_with_foreign_rules();
    let spec = small_spec();
    reconcile_spec(&fw, &spec, &local()).unwrap();
    let acme = tenant_set_name("acme");
    // Someone deletes a member, our rule for globex, and adds a member of their own.
    fw.exec_ipset(&format!("del {acme} 10.42.1.11\nadd {SYSTEM_SET} 10.42.0.77\n")).unwrap();
    let globex = tenant_set_name("globex");
    let rule = format!(
        "-m set --match-set {globex} src -m set --match-set {globex} dst -m comment --comment \"tenant globex\" -j RETURN"
    );
    fw.exec_iptables(&format!("*mangle\n-D {POD_CHAIN} {rule}\nCOMMIT\n")).unwrap();

    let desired = Ruleset::desired(&spec, &local()).unwrap();
    let current = fw.current().unwrap();
    insta::assert_snapshot!("drift_found", drift(&desired, &current).to_string());
    insta::assert_snapshot!("drift_repair_batch", plan(&desired, &current).unwrap().to_string());
    assert!(matches!(reconcile(&fw, &desired).unwrap(), Reconciled::Applied { .. }));
    assert_eq!(fw.current().unwrap(), desired);
}

#[test]
fn removing_a_tenant_removes_exactly_its_rule_and_set() {
    let fw = Recording::new(node_with_foreign_rules());
    let spec = small_spec();
    reconcile_spec(&fw, &spec, &local()).unwrap();
    let before_save = fw.inner().iptables_save();
    let before_sets = fw.inner().ipset_save();
    reconcile_spec(&fw, &without(&spec, "globex"), &local()).unwrap();
    let batch = fw.writes().pop().unwrap();
    insta::assert_snapshot!("remove_tenant_batch", batch.to_string());

    let after_save = fw.inner().iptables_save();
    let gone: Vec<&str> = before_save.lines().filter(|l| !after_save.lines().any(|a| a == *l)).collect();
    let added: Vec<&str> = after_save.lines().filter(|l| !before_save.lines().any(|b| b == *l)).collect();
    assert_eq!(gone.len(), 1, "{gone:?}");
    assert!(gone[0].contains("tenant globex"), "{gone:?}");
    assert!(added.is_empty(), "{added:?}");
    let globex = tenant_set_name("globex");
    let after_sets = fw.inner().ipset_save();
    let sets_gone: Vec<&str> = before_sets.lines().filter(|l| !after_sets.contains(*l)).collect();
    assert!(sets_gone.iter().all(|l| l.contains(&globex)) && sets_gone.len() == 3, "{sets_gone:?}");
    assert!(!after_sets.contains(&globex) && !after_save.contains(&globex));
}

#[test]
fn teardown_leaves_only_what_was_there_before() {
    let fw = node_with_foreign_rules();
    let before = (fw.iptables_save(), fw.ipset_save());
    reconcile_spec(&fw, &small_spec(), &local()).unwrap();
    // An older agent's chain with a jump from OUTPUT, and a staging set left by a crash.
    fw.exec_iptables("*filter\n:HEXA-OLD - [0:0]\n-A OUTPUT -j HEXA-OLD\n-A HEXA-OLD -j RETURN\nCOMMIT\n").unwrap();
    fw.exec_ipset("create hx-sys-new hash:ip family inet\n").unwrap();
    assert!(matches!(teardown(&fw).unwrap(), Reconciled::Applied { .. }));
    assert_eq!((fw.iptables_save(), fw.ipset_save()), before);
    assert_eq!(teardown(&fw).unwrap(), Reconciled::Unchanged);
}

#[test]
fn stale_chains_and_staging_sets_are_cleaned_up() {
    let fw = node_with_foreign_rules();
    let spec = small_spec();
    reconcile_spec(&fw, &spec, &local()).unwrap();
    let acme = tenant_set_name("acme");
    // A crash between creating the staging set and the swap, a chain of an older version.
    fw.exec_ipset(&format!("create {acme}-new hash:ip family inet\nadd {acme}-new 10.42.9.9\ndel {acme} 10.42.0.11\n"))
        .unwrap();
    fw.exec_iptables("*mangle\n:HEXA-OLD - [0:0]\n-A OUTPUT -j HEXA-OLD\n-A HEXA-FWD -j HEXA-OLD\nCOMMIT\n").unwrap();
    let desired = Ruleset::desired(&spec, &local()).unwrap();
    let batch = plan(&desired, &fw.current().unwrap()).unwrap();
    assert!(batch.ipset_prepare.starts_with(&format!("destroy {acme}-new\ncreate {acme}-new ")), "{batch}");
    assert!(batch.iptables.contains("-D OUTPUT -j HEXA-OLD\n") && batch.iptables.contains("-X HEXA-OLD\n"), "{batch}");
    assert!(matches!(reconcile(&fw, &desired).unwrap(), Reconciled::Applied { .. }));
    assert_eq!(fw.current().unwrap(), desired);
}

#[test]
fn the_fake_refuses_what_the_kernel_refuses() {
    let fw = MemoryFirewall::new();
    reconcile_spec(&fw, &small_spec(), &local()).unwrap();
    let err = fw.exec_ipset(&format!("destroy {}\n", tenant_set_name("acme"))).unwrap_err().to_string();
    assert!(err.contains("in use"), "{err}");
    let err = fw.exec_iptables("*mangle\n-X HEXA-POD\nCOMMIT\n").unwrap_err().to_string();
    assert!(err.contains("not empty"), "{err}");
    // A transaction that fails half-way leaves nothing behind.
    let before = fw.iptables_save();
    let err = fw.exec_iptables("*mangle\n-F HEXA-POD\n-A HEXA-POD -m set --match-set hx-nope src -j RETURN\nCOMMIT\n");
    assert!(err.unwrap_err().to_string().contains("line 3"));
    assert_eq!(fw.iptables_save(), before);
}

#[test]
fn a_failing_command_names_the_input_line() {
    let input = "create a hash:ip\nadd a 10.0.0.1\nadd a 10.0.0.1\n";
    let stderr = "ipset v7.17: Error in line 3: Element cannot be added to the set: it's already added";
    assert_eq!(failed_line(stderr, input).as_deref(), Some("add a 10.0.0.1"));
    assert_eq!(failed_line("iptables-restore: line 2 failed", "*filter\n-A X -j Y\n").as_deref(), Some("-A X -j Y"));
    assert_eq!(failed_line("no line number", input), None);
}

#[test]
fn the_system_firewall_reports_a_missing_tool() {
    let fw = SystemFirewall::with_prefix(vec!["/nonexistent/hexa-tool".into()]);
    let err = fw.current().unwrap_err().to_string();
    assert!(err.contains("cannot run `/nonexistent/hexa-tool iptables-save -t mangle`"), "{err}");
}

#[test]
fn synthetic_bench_spec_is_valid_and_as_large_as_asked() {
    let spec = bench::synthetic_spec(500, 20_000);
    let local = bench::synthetic_local_pods(&spec);
    let desired = Ruleset::desired(&spec, &local).unwrap();
    // A set per tenant, the system pods, the nodes and the one node service.
    assert_eq!(desired.sets.len(), 500 + 3);
    let members = 20_000 + spec.system_pod_ips.len() + spec.node_addresses.len() + 3;
    assert_eq!(desired.member_count(), members);
    assert_eq!((spec.node_addresses.len(), local.ports.len()), (200, 100));
    // Per IPv4 chain: FWD 2 spoofing + 1 + 2 management + 2; IN 2 + 1 + 2 + 1; NODE 1 service + 1;
    // POD 2 + one per tenant + 1; SPOOF one per local pod + 1; IPv6 one each; four jumps.
    assert_eq!(desired.rule_count(), 7 + 6 + 2 + (2 + 500 + 1) + (100 + 1) + 2 + 4);
}

const NAMES: [&str; 4] = ["acme", "globex", "initech", "umbrella"];

/// Specs over a small address pool: each address belongs to one tenant, the system, or nobody.
fn spec_strategy() -> impl Strategy<Value = IsolationSpec> {
    (proptest::collection::vec(0usize..6, 24), proptest::collection::vec(any::<bool>(), NAMES.len()), any::<bool>())
        .prop_map(|(owners, hosted, management)| {
            let mut spec = IsolationSpec {
                pod_cidr: "10.42.0.0/16".parse().unwrap(),
                management_cidrs: if management { vec!["192.168.100.0/24".parse().unwrap()] } else { vec![] },
                system_pod_ips: Default::default(),
                tenants: NAMES
                    .iter()
                    .zip(&hosted)
                    .filter(|(_, hosted)| **hosted)
                    .map(|(name, _)| tenant(name, &[]))
                    .collect(),
                node_addresses: Default::default(),
                node_services: Vec::new(),
            };
            for (i, owner) in owners.iter().enumerate() {
                let address = Ipv4Addr::new(10, 42, (i % 3) as u8, 10 + i as u8);
                match owner {
                    4 => {
                        spec.system_pod_ips.insert(address);
                    }
                    5 => {}
                    n => {
                        if let Some(t) = spec.tenants.iter_mut().find(|t| t.tenant == NAMES[*n]) {
                            t.pod_ips.insert(address);
                        }
                    }
                }
            }
            spec
        })
}

proptest! {
    #[test]
    fn any_sequence_of_specs_converges_and_then_writes_nothing(
        specs in proptest::collection::vec(spec_strategy(), 1..4)
    ) {
        let fw = Recording::new(node_with_foreign_rules());
        let foreign = foreign_lines(&fw.inner().iptables_save());
        for spec in &specs {
            let desired = Ruleset::desired(spec, &local()).unwrap();
            reconcile(&fw, &desired).unwrap();
            prop_assert_eq!(fw.current().unwrap(), desired.clone());
            let writes = fw.writes().len();
            prop_assert_eq!(reconcile(&fw, &desired).unwrap(), Reconciled::Unchanged);
            prop_assert_eq!(fw.writes().len(), writes);
            prop_assert_eq!(foreign_lines(&fw.inner().iptables_save()), foreign.clone());
            let sets = fw.inner().ipset_save();
            prop_assert!(!sets.contains("-new "), "staging set left behind: {}", sets);
        }
        teardown(&fw).unwrap();
        prop_assert_eq!(fw.current().unwrap(), Ruleset::default());
    }
}

#[test]
fn an_older_agent_s_filter_chains_are_replaced_by_the_mangle_ones_in_one_batch() {
    let fw = Recording::new(node_with_foreign_rules());
    fw.inner()
        .exec_iptables(
            "*filter\n:HEXA-FWD - [0:0]\n:HEXA-IN - [0:0]\n:HEXA-POD - [0:0]\n-I FORWARD 1 -j HEXA-FWD\n\
             -I INPUT 1 -j HEXA-IN\n-A HEXA-FWD -s 10.42.0.0/16 -d 10.42.0.0/16 -j HEXA-POD\n-A HEXA-POD -j DROP\nCOMMIT\n",
        )
        .unwrap();
    let before = foreign_lines(&fw.inner().iptables_save());
    let desired = Ruleset::desired(&small_spec(), &local()).unwrap();
    assert!(matches!(reconcile(&fw, &desired).unwrap(), Reconciled::Applied { displaced: false, .. }));
    assert_eq!(fw.writes().len(), 1);
    let save = fw.inner().iptables_save();
    assert!(table(&save, "filter").iter().all(|l| !l.contains(CHAIN_PREFIX)), "{save}");
    assert_eq!(foreign_lines(&save), before);
    assert_eq!(fw.current().unwrap(), desired);
}

//! Feeds arbitrary text to the parser that reads the node's firewall back
//! (`Ruleset::from_saves`), as the `iptables-save`, `ip6tables-save` and `ipset save` output the
//! agent reads (the input's first two NUL bytes separate the three; invalid UTF-8 is replaced, as
//! the agent does with the tools' output). Holds:
//! - nothing panics or allocates past the cap;
//! - every rule read back is in the canonical spelling (normalising it again changes nothing), the
//!   spelling both sides of every comparison are in;
//! - the comparison with a desired state is consistent: no drift and no batch exactly when equal;
//! - when the in-memory kernel accepts the same text as its state, one reconcile towards a tenant
//!   spec either is refused by the kernel or converges: it never leaves drift behind.
#![no_main]

use std::sync::OnceLock;

use hexa_agent::isolation::firewall::{
    Firewall, FirewallError, LocalPods, MemoryFirewall, Ruleset, drift, normalize_rule, plan, reconcile,
};
use hexa_shared::isolation::{IsolationSpec, TenantIsolation};
use libfuzzer_sys::fuzz_target;

/// A node hosting two tenants, with system pods, a management host and one local pod.
fn desired() -> &'static Ruleset {
    static DESIRED: OnceLock<Ruleset> = OnceLock::new();
    DESIRED.get_or_init(|| {
        let ip = |s: &str| s.parse().expect("address");
        let spec = IsolationSpec {
            pod_cidr: "10.42.0.0/16".parse().expect("cidr"),
            management_cidrs: vec!["192.168.100.0/24".parse().expect("cidr")],
            system_pod_ips: [ip("10.42.0.53")].into(),
            tenants: vec![
                TenantIsolation { tenant: "acme".into(), pod_ips: [ip("10.42.0.11"), ip("10.42.1.12")].into() },
                TenantIsolation { tenant: "globex".into(), pod_ips: [ip("10.42.2.7")].into() },
            ],
            node_addresses: [ip("192.168.1.10")].into(),
            node_services: Vec::new(),
        };
        let local = LocalPods { ports: [(ip("10.42.0.11"), "veth1234".to_string())].into(), ..LocalPods::default() };
        Ruleset::desired(&spec, &local).expect("the fixed spec is valid")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == 0).map(String::from_utf8_lossy);
    let (iptables, ip6tables, ipset) =
        (parts.next().unwrap_or_default(), parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let Ok(current) = Ruleset::from_saves(&iptables, &ip6tables, &ipset) else { return };

    let rules = current.chains.values().flatten().chain(current.jumps.iter().map(|j| &j.rule));
    for rule in rules {
        assert_eq!(&normalize_rule(rule), rule, "a rule read back is not in the canonical spelling");
    }
    let want = desired();
    assert_eq!(drift(want, &current).is_empty(), *want == current, "drift disagrees with equality");
    assert_eq!(plan(want, &current).is_none(), *want == current, "plan disagrees with equality");
    assert!(drift(&current, &current).is_empty() && plan(&current, &current).is_none());

    let kernel = MemoryFirewall::new();
    let loaded = kernel.exec_ipset(&ipset).and_then(|()| kernel.exec_iptables(&iptables));
    if loaded.and_then(|()| kernel.exec_ip6tables(&ip6tables)).is_err() {
        return;
    }
    match reconcile(&kernel, want) {
        Ok(_) => assert!(drift(want, &kernel.current().expect("reads back")).is_empty()),
        Err(FirewallError::NotConverged(left)) => panic!("a reconcile left drift behind: {left}"),
        Err(_refused_by_the_kernel) => {}
    }
});

use super::*;
use hexa_shared::isolation::{IsolationSpec, TenantIsolation};
use proptest::prelude::*;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn cidr(s: &str) -> Ipv4Cidr {
    s.parse().unwrap()
}

fn pod(namespace: &str, address: &str) -> PodInfo {
    PodInfo {
        namespace: namespace.into(),
        name: format!("p-{address}"),
        uid: format!("u-{address}"),
        ip: Some(ip(address)),
        tenant: tenant_of_namespace(namespace).map(str::to_string),
    }
}

fn live(nodes: &[(&str, Pool)]) -> BTreeMap<String, Standing> {
    nodes.iter().map(|(n, pool)| (n.to_string(), Standing { pool: pool.clone(), live: true })).collect()
}

fn owners() -> PodOwners {
    PodOwners::new(cidr("10.42.0.0/16"), BTreeMap::new())
}

fn tenant(name: &str) -> Option<Owner> {
    Some(Owner::Tenant(name.into()))
}

fn api_pod(namespace: &str, node: &str, address: &str) -> (PodKey, ApiPod) {
    (
        (namespace.to_string(), format!("p-{address}-{node}")),
        ApiPod { namespace: namespace.into(), node: Some(node.into()), ip: Some(ip(address)), holds_ip: true },
    )
}

#[test]
fn a_node_is_pinned_to_the_block_of_its_first_pods_and_speaks_only_inside_it() {
    let mut o = owners();
    assert_eq!(
        o.report("n1", &[pod("hx-acme", "10.42.1.5"), pod("hx-acme", "10.42.1.6")]),
        Pinning::Pinned(cidr("10.42.1.0/24"))
    );
    assert_eq!(o.report("n2", &[pod("hx-globex", "10.42.2.5")]), Pinning::Pinned(cidr("10.42.2.0/24")));
    // n2 now claims n1's pod for itself, and an address in n1's block nobody uses.
    o.report("n2", &[pod("hx-globex", "10.42.2.5"), pod("hx-globex", "10.42.1.5"), pod("hx-acme", "10.42.1.77")]);
    let map = o.resolve(&live(&[("n1", Pool::Shared), ("n2", Pool::Shared)]));
    assert_eq!(map.owner_of(ip("10.42.1.5")), tenant("acme"), "n1's pod stays n1's word");
    assert_eq!(map.owner_of(ip("10.42.1.77")), None);
    assert_eq!(map.tenant_ips("globex"), &[ip("10.42.2.5")].into());
    assert!(map.conflicts().is_empty(), "a claim outside the node's range is no claim");
    assert_eq!(map.refused(), &BTreeMap::from([("n2".to_string(), 2)]), "and it is counted against n2");
    // A report never moves a pin, and an empty report pins nothing.
    assert_eq!(o.report("n2", &[pod("hx-globex", "10.42.9.1")]), Pinning::Unchanged);
    assert_eq!(o.range_of("n2"), [cidr("10.42.2.0/24")]);
    assert_eq!(o.report("n3", &[]), Pinning::Unchanged);
    assert!(o.range_of("n3").is_empty());
}

#[test]
fn a_block_already_pinned_is_not_given_to_a_second_node_until_the_first_is_forgotten() {
    let mut o = owners();
    o.report("n1", &[pod("hx-acme", "10.42.1.5")]);
    let taken = o.report("n2", &[pod("hx-globex", "10.42.1.9"), pod("hx-globex", "10.42.1.10")]);
    assert_eq!(taken, Pinning::Taken { block: cidr("10.42.1.0/24"), holder: "n1".into() });
    let both = live(&[("n1", Pool::Shared), ("n2", Pool::Shared)]);
    assert_eq!(o.resolve(&both).owner_of(ip("10.42.1.9")), None, "n2 has no range");
    assert!(o.forget("n1"));
    assert_eq!(o.report("n2", &[pod("hx-globex", "10.42.1.9")]), Pinning::Pinned(cidr("10.42.1.0/24")));
    assert_eq!(o.resolve(&both).owner_of(ip("10.42.1.9")), tenant("globex"));
}

#[test]
fn the_block_with_most_pods_is_pinned_and_a_narrow_cluster_network_is_one_block() {
    let mut o = owners();
    let pods = [pod("hx-a", "10.42.7.1"), pod("hx-a", "10.42.3.1"), pod("hx-a", "10.42.3.2"), pod("hx-a", "10.43.0.1")];
    assert_eq!(o.report("n1", &pods), Pinning::Pinned(cidr("10.42.3.0/24")));
    let mut narrow = PodOwners::new(cidr("10.42.0.0/26"), BTreeMap::new());
    assert_eq!(narrow.report("n1", &[pod("hx-a", "10.42.0.9")]), Pinning::Pinned(cidr("10.42.0.0/26")));
}

#[test]
fn kube_system_in_a_report_is_a_system_pod_only_on_a_server_node() {
    let mut o = owners();
    o.report("cp-1", &[pod("kube-system", "10.42.0.10")]);
    o.report("w-1", &[pod("kube-system", "10.42.1.10"), pod("hx-acme", "10.42.1.11")]);
    let map = o.resolve(&live(&[("cp-1", Pool::Server), ("w-1", Pool::Shared)]));
    assert_eq!(map.system_ips(), &[ip("10.42.0.10")].into());
    assert_eq!(map.owner_of(ip("10.42.1.10")), None);
    assert_eq!(map.owner_of(ip("10.42.1.11")), tenant("acme"));
}

#[test]
fn a_dedicated_node_speaks_only_for_its_tenant_and_the_namespace_decides() {
    let mut o = owners();
    let mut lying = pod("hx-acme", "10.42.1.7");
    lying.tenant = Some("globex".into());
    let mut untagged = pod("hx-acme", "10.42.1.8");
    untagged.tenant = None;
    o.report("d-1", &[pod("hx-acme", "10.42.1.5"), pod("hx-globex", "10.42.1.6"), lying, untagged]);
    let map = o.resolve(&live(&[("d-1", Pool::Dedicated { tenant: "acme".into() })]));
    assert_eq!(map.tenant_ips("acme"), &[ip("10.42.1.5")].into());
    assert!(map.tenant_ips("globex").is_empty());
}

#[test]
fn two_claims_on_one_ip_drop_it_from_every_set() {
    let mut o = owners();
    o.report("cp-1", &[pod("kube-system", "10.42.0.10"), pod("hx-acme", "10.42.0.10"), pod("hx-acme", "10.42.0.11")]);
    o.report("n1", &[pod("hx-acme", "10.42.1.5"), pod("hx-globex", "10.42.1.5"), pod("hx-acme", "10.42.1.6")]);
    let map = o.resolve(&live(&[("cp-1", Pool::Server), ("n1", Pool::Shared)]));
    assert_eq!(map.conflicts(), &[ip("10.42.0.10"), ip("10.42.1.5")].into());
    assert!(map.system_ips().is_empty());
    assert_eq!(map.tenant_ips("acme"), &[ip("10.42.0.11"), ip("10.42.1.6")].into());
    assert!(map.tenant_ips("globex").is_empty());
}

#[test]
fn reports_of_lost_or_revoked_nodes_count_for_nothing() {
    let mut o = owners();
    o.report("n1", &[pod("hx-acme", "10.42.1.5")]);
    let mut standing = live(&[("n1", Pool::Shared)]);
    assert_eq!(o.resolve(&standing).owner_of(ip("10.42.1.5")), tenant("acme"));
    standing.get_mut("n1").unwrap().live = false;
    assert_eq!(o.resolve(&standing), OwnerMap::default());
    assert_eq!(o.resolve(&BTreeMap::new()), OwnerMap::default(), "nor do nodes the inventory does not know");
}

#[test]
fn with_the_api_reports_are_ignored_and_pods_must_sit_in_their_nodes_range() {
    let mut o = owners();
    o.use_api();
    assert_eq!(o.report("n1", &[pod("hx-evil", "10.42.1.5")]), Pinning::Unchanged, "no pins: the API says");
    o.apply_api(ApiChange::NodesListed(vec![
        ("n1".into(), vec![cidr("10.42.1.0/24")]),
        ("n2".into(), vec![cidr("10.42.2.0/24")]),
        ("n3".into(), vec![]),
    ]));
    let mut mirror = api_pod("hx-acme", "n1", "10.42.1.9").1;
    mirror.holds_ip = false;
    let mut unbound = api_pod("hx-acme", "n1", "10.42.7.1");
    unbound.1.node = None;
    o.apply_api(ApiChange::PodsListed(vec![
        api_pod("hx-acme", "n1", "10.42.1.5"),
        api_pod("kube-system", "n2", "10.42.2.10"),
        // n2's kubelet writes an address of n1's range into its own pod's status.
        api_pod("hx-globex", "n2", "10.42.1.6"),
        // n3 has no range: it is held to addresses outside every node's range.
        api_pod("hx-globex", "n3", "10.42.2.11"),
        api_pod("hx-globex", "n3", "10.42.3.1"),
        (("hx-acme".into(), "mirror".into()), mirror),
        unbound,
        api_pod("default", "n1", "10.42.1.20"),
    ]));
    let map = o.resolve(&BTreeMap::new());
    assert_eq!(map.tenant_ips("acme"), &[ip("10.42.1.5"), ip("10.42.7.1")].into());
    assert_eq!(map.system_ips(), &[ip("10.42.2.10")].into());
    assert_eq!(map.tenant_ips("globex"), &[ip("10.42.3.1")].into());
    assert_eq!(map.owner_of(ip("10.42.1.20")), None, "default's pods are nobody's");
    let refused = BTreeMap::from([("n2".to_string(), 1), ("n3".to_string(), 1)]);
    assert_eq!(map.refused(), &refused, "the mirror pod and default's pod claim nothing");
}

#[test]
fn api_changes_say_whether_they_changed_anything() {
    let mut o = owners();
    o.use_api();
    let (key, p) = api_pod("hx-acme", "n1", "10.42.1.5");
    assert!(o.apply_api(ApiChange::PodApplied(key.clone(), p.clone())));
    assert!(!o.apply_api(ApiChange::PodApplied(key.clone(), p.clone())));
    assert!(!o.apply_api(ApiChange::PodsListed(vec![(key.clone(), p.clone())])));
    let before = o.resolve(&BTreeMap::new());
    assert!(o.apply_api(ApiChange::PodDeleted(key.clone())));
    assert!(!o.apply_api(ApiChange::PodDeleted(key)));
    assert!(o.apply_api(ApiChange::NodeApplied("n1".into(), vec![cidr("10.42.1.0/24")])));
    assert!(!o.apply_api(ApiChange::NodesListed(vec![("n1".into(), vec![cidr("10.42.1.0/24")])])));
    assert!(o.apply_api(ApiChange::NodeDeleted("n1".into())));
    let after = o.resolve(&BTreeMap::new());
    assert_eq!(before.changes(&after), Changes { system: false, tenants: ["acme".to_string()].into() });
    assert!(after.changes(&after).is_empty());
}

#[test]
fn changes_name_the_sets_that_differ() {
    let mut o = owners();
    let standing = live(&[("cp-1", Pool::Server), ("n1", Pool::Shared)]);
    o.report("n1", &[pod("hx-acme", "10.42.1.5"), pod("hx-globex", "10.42.1.6")]);
    let first = o.resolve(&standing);
    o.report("n1", &[pod("hx-acme", "10.42.1.5"), pod("hx-initech", "10.42.1.6")]);
    o.report("cp-1", &[pod("kube-system", "10.42.0.10")]);
    let second = o.resolve(&standing);
    let changes = first.changes(&second);
    assert_eq!(changes, Changes { system: true, tenants: ["globex".to_string(), "initech".to_string()].into() });
    let mut merged = Changes::default();
    merged.merge(changes.clone());
    merged.merge(Changes { system: false, tenants: ["acme".to_string()].into() });
    assert!(merged.system && merged.tenants.len() == 3);
}

// ----- properties -----------------------------------------------------------------------------

const NODES: [&str; 4] = ["n0", "n1", "n2", "n3"];
const NAMESPACES: [&str; 5] = ["hx-acme", "hx-globex", "hx-initech", "kube-system", "default"];

/// A pod somewhere in 10.42.0.0/22, so that nodes' reports overlap each other's blocks.
fn any_pod() -> impl Strategy<Value = PodInfo> {
    (0usize..NAMESPACES.len(), 0u8..4, 0u8..8, proptest::option::of("[a-z]{3,6}")).prop_map(
        |(ns, third, fourth, said)| {
            let namespace = NAMESPACES[ns];
            let mut p = pod(namespace, &format!("10.42.{third}.{fourth}"));
            if let Some(said) = said.filter(|_| fourth % 3 == 0) {
                p.tenant = Some(said);
            }
            p
        },
    )
}

fn reports() -> impl Strategy<Value = Vec<(usize, Vec<PodInfo>)>> {
    proptest::collection::vec((0usize..NODES.len(), proptest::collection::vec(any_pod(), 0..6)), 0..10)
}

fn pools() -> impl Strategy<Value = Vec<(Pool, bool)>> {
    let pool = prop_oneof![Just(Pool::Server), Just(Pool::Shared), Just(Pool::Dedicated { tenant: "acme".into() })];
    proptest::collection::vec((pool, any::<bool>()), NODES.len())
}

fn standing_of(pools: &[(Pool, bool)]) -> BTreeMap<String, Standing> {
    NODES
        .iter()
        .zip(pools)
        .map(|(n, (pool, live))| (n.to_string(), Standing { pool: pool.clone(), live: *live }))
        .collect()
}

fn feed(o: &mut PodOwners, reports: &[(usize, Vec<PodInfo>)]) {
    for (node, pods) in reports {
        o.report(NODES[*node], pods);
    }
}

/// The spec a node hosting every tenant would get from `map`.
fn spec_from(map: &OwnerMap) -> IsolationSpec {
    IsolationSpec {
        pod_cidr: cidr("10.42.0.0/16"),
        management_cidrs: vec![cidr("192.0.2.0/24")],
        system_pod_ips: map.system_ips().clone(),
        tenants: ["acme", "globex", "initech"]
            .iter()
            .map(|t| TenantIsolation { tenant: t.to_string(), pod_ips: map.tenant_ips(t).clone() })
            .collect(),
        node_addresses: BTreeSet::new(),
        node_services: Vec::new(),
    }
}

proptest! {
    /// Whatever the nodes say, every spec cut from the map is one a node accepts, and every IP in
    /// it lies in the range of a live node that reported it.
    #[test]
    fn any_reports_give_specs_nodes_accept(reports in reports(), pools in pools()) {
        let mut o = owners();
        feed(&mut o, &reports);
        let standing = standing_of(&pools);
        let map = o.resolve(&standing);
        prop_assert_eq!(spec_from(&map).validate(), Ok(()));
        let owned = map.system_ips().iter().chain(["acme", "globex", "initech"].iter().flat_map(|t| map.tenant_ips(t)));
        for ip in owned {
            let speaker = NODES.iter().find(|n| o.range_of(n).iter().any(|r| r.contains(*ip)));
            prop_assert!(speaker.is_some_and(|n| standing[*n].live), "{ip} from no live node's range");
        }
        let pins: Vec<&Ipv4Cidr> = o.pins().values().collect();
        for (i, a) in pins.iter().enumerate() {
            prop_assert!(pins[i + 1..].iter().all(|b| !a.overlaps(b)), "two nodes share a range");
        }
    }

    /// One node's word, whatever it is, changes nothing outside that node's own range, and never
    /// adds a system pod unless it is a server.
    #[test]
    fn a_node_gains_nothing_outside_its_range(
        honest in reports(),
        lies in proptest::collection::vec(proptest::collection::vec(any_pod(), 0..12), 1..4),
        pools in pools(),
    ) {
        // The honest nodes report first (they were there before the attacker turned).
        let honest: Vec<(usize, Vec<PodInfo>)> = honest.into_iter().filter(|(n, _)| *n != 0).collect();
        let standing = standing_of(&pools);
        let mut without = owners();
        feed(&mut without, &honest);
        let mut with = without.clone();
        for lie in &lies {
            with.report("n0", lie);
        }
        let (before, after) = (without.resolve(&standing), with.resolve(&standing));
        let attacker = with.range_of("n0");
        for third in 0u8..4 {
            for fourth in 0u8..8 {
                let ip = Ipv4Addr::new(10, 42, third, fourth);
                if attacker.iter().any(|r| r.contains(ip)) {
                    prop_assert!(before.owner_of(ip).is_none(), "{ip}: no one else spoke for it");
                    if after.owner_of(ip) == Some(Owner::System) {
                        prop_assert_eq!(&pools[0].0, &Pool::Server);
                    }
                } else {
                    prop_assert_eq!(before.owner_of(ip), after.owner_of(ip), "{} changed hands", ip);
                    prop_assert_eq!(before.conflicts().contains(&ip), after.conflicts().contains(&ip));
                }
            }
        }
    }

    /// With the API, an address inside a node's range is owned only on the word of pods bound to
    /// that node, whatever the other nodes' kubelets write, and the specs still validate.
    #[test]
    fn with_the_api_no_node_claims_inside_another_nodes_range(
        pods in proptest::collection::vec((0usize..NODES.len(), 0usize..NAMESPACES.len(), 0u8..4, 0u8..8), 0..24),
    ) {
        let mut o = owners();
        o.use_api();
        // n3 has no range: it may speak only outside every range.
        let ranges = vec![
            ("n0".to_string(), vec![cidr("10.42.0.0/24")]),
            ("n1".to_string(), vec![cidr("10.42.1.0/24")]),
            ("n2".to_string(), vec![cidr("10.42.2.0/25")]),
        ];
        o.apply_api(ApiChange::NodesListed(ranges.clone()));
        let listed: Vec<(PodKey, ApiPod)> = pods
            .iter()
            .map(|(node, ns, third, fourth)| api_pod(NAMESPACES[*ns], NODES[*node], &format!("10.42.{third}.{fourth}")))
            .collect();
        o.apply_api(ApiChange::PodsListed(listed.clone()));
        let map = o.resolve(&BTreeMap::new());
        prop_assert_eq!(spec_from(&map).validate(), Ok(()));
        for (_, pod) in &listed {
            let ip = pod.ip.unwrap();
            let Some(owner) = map.owner_of(ip) else { continue };
            let holder = ranges.iter().find(|(_, rs)| rs.iter().any(|r| r.contains(ip))).map(|(n, _)| n.as_str());
            // Some pod with this owner, bound to the range's node (or anywhere outside all ranges), says so.
            let said = listed.iter().any(|(_, p)| {
                p.ip == Some(ip)
                    && Owner::of_namespace(&p.namespace) == Some(owner.clone())
                    && holder.is_none_or(|h| p.node.as_deref() == Some(h))
            });
            prop_assert!(said, "{} owned as {:?} without its node's word", ip, owner);
        }
    }

    /// With the API, reports make no difference at all.
    #[test]
    fn with_the_api_reports_change_nothing(reports in reports(), pools in pools()) {
        let mut quiet = owners();
        quiet.use_api();
        quiet.apply_api(ApiChange::NodesListed(vec![("n1".into(), vec![cidr("10.42.1.0/24")])]));
        quiet.apply_api(ApiChange::PodsListed(vec![api_pod("hx-acme", "n1", "10.42.1.5"), api_pod("kube-system", "n2", "10.42.0.10")]));
        let mut told = quiet.clone();
        feed(&mut told, &reports);
        let standing = standing_of(&pools);
        prop_assert_eq!(quiet.resolve(&standing), told.resolve(&standing));
        prop_assert!(told.pins().is_empty());
    }
}

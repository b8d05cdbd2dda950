use super::*;
use crate::config::K3sSettings;
use crate::tokens::{self, TokenRequest};
use hexa_shared::k3s::JoinToken;
use hexa_shared::proto::{PROTOCOL_VERSION, ProviderIdentity};

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    inventory: Inventory,
}

fn fixture(k3s: K3sSettings) -> Fixture {
    fixture_with(k3s, None)
}

fn fixture_with(k3s: K3sSettings, isolation: Option<desired::IsolationPlan>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.redb")).unwrap();
    let (ca, _) = CertificateAuthority::load_or_create(dir.path()).unwrap();
    let k3s = desired::K3sPlan { settings: k3s, server_secret: "s".repeat(32), agent_secret: "a".repeat(32) };
    let plans = Plans { k3s, isolation };
    let inventory =
        Inventory::load(store.clone(), Arc::new(ca), T, Duration::from_secs(3600), Default::default(), plans).unwrap();
    Fixture { _dir: dir, store, inventory }
}

fn csr() -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::default().serialize_request(&key).unwrap().der().to_vec()
}

fn enroll(f: &Fixture, token: &str, name: &str) -> String {
    let req = EnrollRequest {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "test".into(),
        token: token.into(),
        csr_der: csr(),
        hostname: name.into(),
        machine_id: "m".into(),
        requested_name: Some(name.into()),
        provider: ProviderIdentity::None,
    };
    f.inventory.enroll(&req).unwrap();
    f.inventory.record(name).unwrap().cert_serial
}

fn token(f: &Fixture, pool: Pool) -> String {
    let req = TokenRequest { pool, ttl: Duration::from_secs(60), description: String::new(), node_class: None };
    tokens::create(&f.store, req, &[]).unwrap().token
}

const ADDR: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

#[test]
fn a_superseded_certificate_loses_its_link_and_cannot_renew() {
    let f = fixture(K3sSettings { manage: false, ..Default::default() });
    let old = enroll(&f, &token(&f, Pool::Shared), "n1");
    let mut link = f.inventory.admit_link("n1", &old, ADDR).unwrap();
    assert!(link.auth.borrow_and_update().refuses("n1", &old).is_none());
    let record = f.inventory.record("n1").unwrap();
    let again = tokens::create_reenroll(&f.store, &record, Duration::from_secs(60)).unwrap();
    let new = enroll(&f, &again.token, "n1");
    // The open link hears of it at once, and its certificate no longer renews.
    assert!(link.auth.has_changed().unwrap());
    let refused = link.auth.borrow_and_update().refuses("n1", &old).unwrap();
    assert_eq!(refused.code, RefusalCode::CertificateSuperseded);
    assert_eq!(f.inventory.renew("n1", &old, &csr()).unwrap_err().code, RefusalCode::CertificateSuperseded);
    assert!(f.inventory.admit_link("n1", &old, ADDR).is_err());
    // The current one renews; the renewing link keeps working until the new one is used.
    let mut current = f.inventory.admit_link("n1", &new, ADDR).unwrap();
    f.inventory.renew("n1", &new, &csr()).unwrap();
    assert!(current.auth.borrow_and_update().refuses("n1", &new).is_none());
    let renewed = f.inventory.record("n1").unwrap().cert_serial;
    f.inventory.admit_link("n1", &renewed, ADDR).unwrap();
    assert!(current.auth.borrow_and_update().refuses("n1", &new).is_some(), "retired with its first use");
}

#[test]
fn revocation_and_deletion_close_links() {
    let f = fixture(K3sSettings { manage: false, ..Default::default() });
    let serial = enroll(&f, &token(&f, Pool::Shared), "n1");
    let mut link = f.inventory.admit_link("n1", &serial, ADDR).unwrap();
    let view = f.inventory.revoke("n1").unwrap().unwrap();
    assert!(view.revoked_at_unix.is_some());
    let refused = link.auth.borrow_and_update().refuses("n1", &serial).unwrap();
    assert_eq!(refused.code, RefusalCode::CertificateRevoked);
    assert_eq!(f.inventory.admit_link("n1", &serial, ADDR).unwrap_err().code, RefusalCode::CertificateRevoked);
    let serial = enroll(&f, &token(&f, Pool::Shared), "n2");
    let link = f.inventory.admit_link("n2", &serial, ADDR).unwrap();
    assert!(f.inventory.forget("n2").unwrap().is_some());
    assert!(link.auth.has_changed().is_err(), "the sender is gone, which closes the link");
    assert!(f.inventory.get("n2").is_none() && !f.store.nodes().unwrap().contains_key("n2"));
    assert!(f.inventory.forget("n2").unwrap().is_none());
}

#[test]
fn a_generation_ahead_of_ours_is_overtaken() {
    let f = fixture(K3sSettings { manage: false, ..Default::default() });
    enroll(&f, &token(&f, Pool::Shared), "n1");
    let before = f.inventory.record("n1").unwrap().spec.generation;
    assert!(before < 1000);
    f.inventory.catch_up_generation("n1", 1000).unwrap();
    assert_eq!(f.inventory.record("n1").unwrap().spec.generation, 1001);
    assert_eq!(f.store.nodes().unwrap()["n1"].spec.generation, 1001, "persisted");
    f.inventory.catch_up_generation("n1", 3).unwrap();
    assert_eq!(f.inventory.record("n1").unwrap().spec.generation, 1001, "never backwards");
}

#[test]
fn agents_join_with_the_agent_token_pinned_to_the_ca_the_first_server_reports() {
    let f = fixture(K3sSettings::default());
    enroll(&f, &token(&f, Pool::Server), "cp-1");
    let server = f.inventory.record("cp-1").unwrap().spec.k3s.unwrap();
    assert_eq!(server.token.as_ref().map(JoinToken::expose), Some("s".repeat(32).as_str()));
    assert_eq!(server.agent_token.as_ref().map(JoinToken::expose), Some("a".repeat(32).as_str()));
    let serial = f.inventory.record("cp-1").unwrap().cert_serial;
    f.inventory.admit_link("cp-1", &serial, ADDR).unwrap();
    enroll(&f, &token(&f, Pool::Shared), "w-1");
    assert!(f.inventory.record("w-1").unwrap().spec.k3s.is_none(), "waits for the cluster CA");
    let report = |name: &str, ca: &str| CapacityReport {
        node_name: name.into(),
        k3s: hexa_shared::k3s::K3sState::Running { version: "v1".into(), cluster_ca_sha256: Some(ca.into()) },
        ..Default::default()
    };
    // Only the first server speaks for the cluster's CA.
    f.inventory.record_report("w-1", report("w-1", &"e".repeat(64)));
    assert!(f.inventory.record("w-1").unwrap().spec.k3s.is_none());
    f.inventory.record_report("cp-1", report("cp-1", &"c".repeat(64)));
    let agent = f.inventory.record("w-1").unwrap().spec.k3s.unwrap();
    let want = format!("K10{}::node:{}", "c".repeat(64), "a".repeat(32));
    assert_eq!(agent.token.as_ref().map(JoinToken::expose), Some(want.as_str()));
    assert_eq!(agent.agent_token, None);
    assert!(!format!("{agent:?}").contains(&"a".repeat(32)), "Debug shows no token");
}

fn pods_report(pods: &[(&str, &str)]) -> CapacityReport {
    let pods = pods
        .iter()
        .map(|(namespace, ip)| hexa_shared::report::PodInfo {
            namespace: namespace.to_string(),
            name: format!("pod-{ip}"),
            uid: format!("uid-{ip}"),
            ip: Some(ip.parse().unwrap()),
            tenant: hexa_shared::names::tenant_of_namespace(namespace).map(str::to_string),
        })
        .collect();
    CapacityReport { pods, ..Default::default() }
}

fn isolation_plan() -> desired::IsolationPlan {
    desired::IsolationPlan {
        pod_cidr: "10.42.0.0/16".parse().unwrap(),
        management_cidrs: vec![],
        kube_api_port: 6443,
        kubelet_port: 10250,
    }
}

fn allocation(tenant: &str) -> TenantAllocation {
    desired::AllocationPlan { pids_per_pod: 10 }.allocation(
        tenant,
        hexa_shared::tenant::ShareSize { cpu_millis: 100, memory_bytes: 1 << 28, pods: 2 },
        false,
    )
}

#[test]
fn pod_ownership_recomputes_only_the_nodes_whose_sets_changed_and_its_ranges_persist() {
    let plan = isolation_plan();
    let f = fixture_with(K3sSettings { manage: false, ..Default::default() }, Some(plan));
    for (name, tenant) in [("n1", "acme"), ("n2", "globex")] {
        enroll(&f, &token(&f, Pool::Shared), name);
        f.inventory.set_tenants(name, vec![allocation(tenant)]).unwrap();
    }
    let generation = |name: &str| f.inventory.record(name).unwrap().spec.generation;
    let ips = |name: &str, tenant: &str| {
        let spec = f.inventory.record(name).unwrap().spec.isolation.unwrap();
        spec.tenant(tenant).map(|t| t.pod_ips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>())
    };
    f.inventory.record_report("n1", pods_report(&[("hx-acme", "10.42.1.5")]));
    f.inventory.record_report("n2", pods_report(&[("hx-globex", "10.42.2.5")]));
    f.inventory.refresh_desired().unwrap();
    assert_eq!(ips("n1", "acme"), Some(vec!["10.42.1.5".to_string()]));
    assert_eq!(ips("n2", "globex"), Some(vec!["10.42.2.5".to_string()]));
    let (g1, g2) = (generation("n1"), generation("n2"));

    // A new acme pod changes acme's set: n1 (holding acme) gets a new spec, n2 does not.
    f.inventory.record_report("n1", pods_report(&[("hx-acme", "10.42.1.5"), ("hx-acme", "10.42.1.6")]));
    f.inventory.refresh_desired().unwrap();
    assert_eq!(ips("n1", "acme").map(|v| v.len()), Some(2));
    assert_eq!((generation("n1"), generation("n2")), (g1 + 1, g2));
    // n2 claiming n1's pod under globex, and kube-system pods, changes no set anywhere.
    f.inventory.record_report(
        "n2",
        pods_report(&[("hx-globex", "10.42.2.5"), ("hx-globex", "10.42.1.5"), ("kube-system", "10.42.2.9")]),
    );
    f.inventory.refresh_desired().unwrap();
    assert_eq!((generation("n1"), generation("n2")), (g1 + 1, g2), "the map did not change");
    assert!(f.inventory.record("n1").unwrap().spec.isolation.unwrap().system_pod_ips.is_empty());

    // The ranges nodes were pinned to survive a restart of the coordinator.
    let pins: BTreeMap<String, String> = f.store.meta(POD_RANGE_PINS).unwrap().unwrap();
    assert_eq!(pins, BTreeMap::from([("n1".into(), "10.42.1.0/24".into()), ("n2".into(), "10.42.2.0/24".into())]));
    // Forgetting a node frees its range.
    f.inventory.forget("n2").unwrap();
    let pins: BTreeMap<String, String> = f.store.meta(POD_RANGE_PINS).unwrap().unwrap();
    assert_eq!(pins.keys().collect::<Vec<_>>(), ["n1"]);
}

#[test]
fn a_lost_nodes_pods_leave_the_other_nodes_sets() {
    let plan = isolation_plan();
    let f = fixture_with(K3sSettings { manage: false, ..Default::default() }, Some(plan));
    for name in ["n1", "n2"] {
        enroll(&f, &token(&f, Pool::Shared), name);
        f.inventory.set_tenants(name, vec![allocation("acme")]).unwrap();
    }
    f.inventory.record_report("n1", pods_report(&[("hx-acme", "10.42.1.5")]));
    f.inventory.record_report("n2", pods_report(&[("hx-acme", "10.42.2.5")]));
    f.inventory.refresh_desired().unwrap();
    let acme =
        |name: &str| f.inventory.record(name).unwrap().spec.isolation.unwrap().tenant("acme").unwrap().pod_ips.len();
    assert_eq!(acme("n1"), 2);
    f.inventory.tick(Instant::now() + T.lost_after + Duration::from_secs(1));
    assert_eq!(f.inventory.record("n2").unwrap().health, Health::Lost);
    f.inventory.refresh_desired().unwrap();
    assert_eq!(acme("n1"), 0, "both nodes are Lost now: neither's report counts");
    f.inventory.record_report("n1", pods_report(&[("hx-acme", "10.42.1.5")]));
    f.inventory.refresh_desired().unwrap();
    assert_eq!(acme("n1"), 1, "n1 reports again; n2 stays Lost");
}

const T: HealthThresholds = HealthThresholds {
    unreachable_after: Duration::from_secs(3),
    lost_after: Duration::from_secs(30),
    start_grace: Duration::ZERO,
};

#[test]
fn silence_turns_into_health() {
    let table = [
        (Health::Ready, 0, Health::Ready),
        (Health::Ready, 2, Health::Ready),
        (Health::Ready, 3, Health::Unreachable),
        (Health::Unreachable, 29, Health::Unreachable),
        (Health::Unreachable, 30, Health::Lost),
        (Health::Pending, 1, Health::Pending),
        (Health::Pending, 5, Health::Unreachable),
        (Health::Lost, 5, Health::Lost),
        (Health::Lost, 0, Health::Lost),
    ];
    for (current, secs, want) in table {
        assert_eq!(judge_health(current, Duration::from_secs(secs), T), want, "{current:?} after {secs}s");
    }
}

#[test]
fn metrics_see_reconnects_and_each_node_figures_under_its_own_name() {
    let f = fixture(K3sSettings { manage: false, ..Default::default() });
    let serial = enroll(&f, &token(&f, Pool::Shared), "n1");
    enroll(&f, &token(&f, Pool::Shared), "n2");
    let figures = |name: &str| f.inventory.node_figures().into_iter().find(|n| n.node == name).unwrap();
    assert_eq!((figures("n1").link_reconnects, figures("n1").reported), (0, None));
    f.inventory.admit_link("n1", &serial, ADDR).unwrap();
    f.inventory.link_closed("n1");
    assert_eq!(figures("n1").link_reconnects, 0, "a first link is no reconnect");
    f.inventory.admit_link("n1", &serial, ADDR).unwrap();
    f.inventory.admit_link("n1", &serial, ADDR).unwrap();
    assert_eq!(figures("n1").link_reconnects, 2);

    let isolation = hexa_shared::report::IsolationFigures { firewall_drift_repairs: 4, ..Default::default() };
    let report = CapacityReport {
        node_name: "n2".into(),
        collected_at_unix_ms: hexa_shared::clock::now_unix_ms(),
        firewall_displacements: 1,
        isolation,
        ..Default::default()
    };
    // What n1's report claims is n1's, whatever name it carries.
    f.inventory.record_report("n1", report);
    let reported = figures("n1").reported.unwrap();
    assert_eq!((reported.isolation.firewall_drift_repairs, reported.firewall_displacements), (4, 1));
    assert_eq!(figures("n2").reported, None);
    assert_eq!(f.inventory.metrics().reports.get(), 1);
}

#[test]
fn a_restart_finds_every_node_pending_except_the_lost_ones() {
    let f = fixture(K3sSettings::default());
    for name in ["ready", "silent", "gone"] {
        enroll(&f, &token(&f, Pool::Shared), name);
        f.inventory.record_report(name, CapacityReport::default());
    }
    // All Lost, then two back and silent again, and one of those reporting once more.
    f.inventory.tick(Instant::now() + T.lost_after + Duration::from_secs(1));
    f.inventory.record_report("ready", CapacityReport::default());
    f.inventory.record_report("silent", CapacityReport::default());
    f.inventory.tick(Instant::now() + T.unreachable_after + Duration::from_secs(1));
    f.inventory.record_report("ready", CapacityReport::default());
    let stored = |name: &str| f.store.nodes().unwrap()[name].health;
    assert_eq!(
        [stored("ready"), stored("silent"), stored("gone")],
        [Health::Ready, Health::Unreachable, Health::Lost],
        "every change is in the store when it shows"
    );

    let (ca, _) = CertificateAuthority::load_or_create(f._dir.path()).unwrap();
    let k3s = desired::K3sPlan {
        settings: K3sSettings::default(),
        server_secret: "s".repeat(32),
        agent_secret: "a".repeat(32),
    };
    let plans = Plans { k3s, isolation: None };
    let restarted =
        Inventory::load(f.store.clone(), Arc::new(ca), T, Duration::from_secs(3600), Default::default(), plans)
            .unwrap();
    let health = |name: &str| restarted.get(name).unwrap().health;
    assert_eq!([health("ready"), health("silent"), health("gone")], [Health::Pending, Health::Pending, Health::Lost]);
    assert_eq!([stored("ready"), stored("silent"), stored("gone")], [Health::Pending, Health::Pending, Health::Lost]);
}

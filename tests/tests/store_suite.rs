//! The coordinator's store on both backends: the same suite on a redb file and on a real
//! three-member etcd cluster on loopback, and what etcd adds: a member lost changes nothing, a
//! quorum lost fails writes with a clear error (no hang) until it is back, and a transaction whose
//! reads another coordinator changed commits nothing.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use hexa_coordinator::store::{BackendKind, Store, StoreError, StoreSettings, suite};
use hexa_tests::etcd::{self, EtcdCluster};

fn etcd_settings(endpoints: Vec<String>, prefix: &str) -> StoreSettings {
    StoreSettings {
        backend: BackendKind::Etcd,
        endpoints,
        prefix: prefix.to_string(),
        dial_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(3),
        ..Default::default()
    }
}

fn open_etcd(endpoints: &[String], prefix: &str) -> Result<Store, StoreError> {
    Store::open_configured(&etcd_settings(endpoints.to_vec(), prefix), Path::new("/nonexistent"))
}

/// A 3-member cluster, or `None` (said by name) where etcd is not installed.
fn cluster(test: &str) -> EtcdCluster {
    // scripts/test installs etcd: without it this is a failure to say, not a test to skip.
    if let Some(why) = etcd::unavailable() {
        panic!("{test} needs a real etcd: {why}");
    }
    EtcdCluster::start(3)
}

/// Runs `f` on another thread and gives up waiting after `limit`: a store call that hangs fails
/// the test instead of hanging it.
fn bounded<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| panic!("a store call did not return within {limit:?}"))
}

#[test]
fn the_store_suite_passes_on_redb() {
    let dir = tempfile::tempdir().unwrap();
    suite::run(&|state: &str| Store::open(&dir.path().join(format!("{state}.redb"))));
}

#[test]
fn the_store_suite_passes_on_etcd() {
    let cluster = cluster("the_store_suite_passes_on_etcd");
    let endpoints = cluster.endpoints();
    suite::run(&|state: &str| open_etcd(&endpoints, &format!("/suite/{state}/")));
}

#[test]
fn etcd_goes_on_without_a_member_and_refuses_writes_without_a_quorum() {
    let mut cluster = cluster("etcd_goes_on_without_a_member_and_refuses_writes_without_a_quorum");
    let endpoints = cluster.endpoints();
    let store = open_etcd(&endpoints, "/quorum/").unwrap();
    store.write::<_, StoreError>(|tx| tx.put_token(&suite::token("before"))).unwrap();

    // One of three gone: reads and writes go on, whichever member the client was talking to.
    for member in 0..3 {
        cluster.kill(member);
        for i in 0..10 {
            let id = format!("m{member}i{i}");
            store.write::<_, StoreError>(|tx| tx.put_token(&suite::token(&id))).unwrap();
            assert!(store.tokens().unwrap().contains_key(&id));
        }
        cluster.restart(member);
        cluster.wait_healthy(member, Duration::from_secs(30));
    }
    assert_eq!(store.tokens().unwrap().len(), 31);

    // Two of three gone: no quorum. A write fails, saying why, and returns.
    cluster.kill(1);
    cluster.kill(2);
    let writer = store.clone();
    let err = bounded(Duration::from_secs(30), move || {
        writer.write::<_, StoreError>(|tx| tx.put_token(&suite::token("lost")))
    })
    .unwrap_err()
    .to_string();
    println!("without a quorum: {err}");
    assert!(err.contains("no member answered") && err.contains("quorum"), "{err}");

    // Quorum back: writes succeed again, and nothing acknowledged was lost.
    cluster.restart(1);
    cluster.restart(2);
    for member in 0..3 {
        cluster.wait_healthy(member, Duration::from_secs(30));
    }
    store.write::<_, StoreError>(|tx| tx.put_token(&suite::token("after"))).unwrap();
    let tokens = store.tokens().unwrap();
    assert!(tokens.contains_key("before") && tokens.contains_key("after"), "{:?}", tokens.keys());
    // A write that timed out has no known outcome: a member that had taken it into its log while
    // it could not reach the others may still commit it once they are back (Raft), as a request in
    // flight when a server dies may have been applied. Nothing else may appear.
    let expected = if tokens.contains_key("lost") { 33 } else { 32 };
    assert_eq!(tokens.len(), expected, "{:?}", tokens.keys());
}

#[test]
fn etcd_refuses_a_transaction_whose_reads_another_coordinator_changed() {
    let cluster = cluster("etcd_refuses_a_transaction_whose_reads_another_coordinator_changed");
    let endpoints = cluster.endpoints();
    let ours = open_etcd(&endpoints, "/two/").unwrap();
    let theirs = open_etcd(&endpoints, "/two/").unwrap();
    ours.set_meta("count", &1u64).unwrap();
    let result = ours.write::<_, StoreError>(|tx| {
        let count: u64 = tx.meta("count")?.unwrap_or(0);
        // Another coordinator on the same prefix writes what we just read.
        theirs.set_meta("count", &10u64)?;
        tx.set_meta("count", &(count + 1))?;
        tx.put_token(&suite::token("ours"))
    });
    let err = result.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert!(err.to_string().contains("nothing was written"), "{err}");
    assert_eq!(ours.meta::<u64>("count").unwrap(), Some(10));
    assert!(ours.tokens().unwrap().is_empty());
}

#[test]
fn etcd_unreachable_at_start_is_refused_in_bounded_time() {
    // A port nothing listens on: a start says so instead of waiting for ever.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut settings = etcd_settings(vec![format!("http://127.0.0.1:{port}")], "/nowhere/");
    settings.dial_timeout = Duration::from_secs(2);
    let err = bounded(Duration::from_secs(30), move || Store::open_configured(&settings, Path::new("/nonexistent")))
        .unwrap_err()
        .to_string();
    assert!(err.contains(&format!("127.0.0.1:{port}")) && err.contains("store.endpoints"), "{err}");
}

#[test]
fn a_deposed_leaders_writes_are_refused() {
    let cluster = cluster("a_deposed_leaders_writes_are_refused");
    let endpoints = cluster.endpoints();
    let first = open_etcd(&endpoints, "/lead/").unwrap();
    let second = open_etcd(&endpoints, "/lead/").unwrap();
    let led = first.campaign("first", Duration::from_secs(10)).unwrap();
    first.set_meta("by", &"first").unwrap();
    // The first leader's lease ends as it does when it stalls past its TTL (here revoked).
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &endpoints.join(","), "lease", "revoke", &format!("{:x}", led.lease)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let leads = second.campaign("second", Duration::from_secs(10)).unwrap();
    assert_ne!(leads.revision, led.revision);
    // The deposed leader wakes up and writes: refused, and nothing of it lands.
    let err = first
        .write::<_, StoreError>(|tx| {
            tx.set_meta("by", &"first, deposed")?;
            tx.put_token(&suite::token("stale"))
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::NotLeader { .. }), "{err}");
    assert!(err.to_string().contains("no longer leads"), "{err}");
    second.set_meta("by", &"second").unwrap();
    assert_eq!(second.meta::<String>("by").unwrap().as_deref(), Some("second"));
    assert!(second.tokens().unwrap().is_empty());
}

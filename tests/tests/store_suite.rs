//! The coordinator's store on both backends: the same suite on a redb file and on a real
//! three-member etcd cluster on loopback, and what etcd adds: a member lost changes nothing, a
//! quorum lost fails writes with a clear error (no hang) until it is back, and a transaction whose
//! reads another coordinator changed commits nothing; and the coordinators' one CA, sealed in it.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use hexa_coordinator::bootstrap::CertificateAuthority;
use hexa_coordinator::ca_seal::{CA_META_KEY, SEAL_KEY_FILE, SealKey, SealKeys, SealedCa};
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

/// A coordinator's state directory, private as the coordinator makes it.
fn state_dir(root: &Path, name: &str) -> std::path::PathBuf {
    let dir = root.join(name);
    hexa_shared::fsutil::ensure_private_dir(&dir).unwrap();
    dir
}

fn seal_keys(dir: &Path, previous: Option<&Path>) -> SealKeys {
    SealKeys::from_files(&dir.join(SEAL_KEY_FILE), previous).unwrap()
}

fn stored_seal_key_id(store: &Store) -> String {
    store.meta::<SealedCa>(CA_META_KEY).unwrap().expect("the store holds the CA").seal_key_id
}

#[test]
fn coordinators_on_one_etcd_share_one_ca_sealed_with_a_key_they_copy() {
    let cluster = cluster("coordinators_on_one_etcd_share_one_ca_sealed_with_a_key_they_copy");
    let endpoints = cluster.endpoints();
    let root = tempfile::tempdir().unwrap();
    let (one, two, three) =
        (state_dir(root.path(), "one"), state_dir(root.path(), "two"), state_dir(root.path(), "three"));
    let store_one = open_etcd(&endpoints, "/ca/").unwrap();
    let store_two = open_etcd(&endpoints, "/ca/").unwrap();

    // The first coordinator makes the seal key and the CA.
    let (first, created) =
        CertificateAuthority::load_or_create_shared(&one, &store_one, &seal_keys(&one, None), true).unwrap();
    assert!(created);
    let record = store_two.meta::<SealedCa>(CA_META_KEY).unwrap().unwrap();
    assert!(!record.sealed_key.contains("PRIVATE KEY"));
    // What etcd holds is sealed: the key's PEM is nowhere in it.
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &endpoints.join(","), "get", "/ca/meta/ca", "--print-value-only"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let raw = String::from_utf8_lossy(&out.stdout);
    assert!(raw.contains("BEGIN CERTIFICATE") && !raw.contains("PRIVATE KEY"), "{raw}");

    // The second without the seal key: refused, saying what to copy where; nothing written.
    let err = CertificateAuthority::load_or_create_shared(&two, &store_two, &seal_keys(&two, None), true)
        .unwrap_err()
        .to_string();
    println!("without the seal key: {err}");
    let two_key = two.join(SEAL_KEY_FILE);
    assert!(err.contains("copy the seal key file") && err.contains(&two_key.display().to_string()), "{err}");
    assert!(err.contains(&record.seal_key_id), "{err}");
    assert!(!two_key.exists() && !two.join("ca.key").exists() && !two.join("ca.crt").exists());

    // With a copy of it: the same CA, also in its state directory.
    std::fs::copy(one.join(SEAL_KEY_FILE), &two_key).unwrap();
    let (second, created) =
        CertificateAuthority::load_or_create_shared(&two, &store_two, &seal_keys(&two, None), true).unwrap();
    assert!(!created);
    assert_eq!(second.hash(), first.hash());
    assert_eq!(CertificateAuthority::load_or_create(&two).unwrap().0.hash(), first.hash());

    // Rotation: the leader has the new key as current and the old one as previous.
    let old_key = root.path().join("old-seal.key");
    std::fs::copy(&two_key, &old_key).unwrap();
    std::fs::remove_file(&two_key).unwrap();
    let new_key = SealKey::create(&two_key).unwrap();
    let rotating = seal_keys(&two, Some(&old_key));
    let (rotated, _) = CertificateAuthority::load_or_create_shared(&two, &store_two, &rotating, true).unwrap();
    assert_eq!(rotated.hash(), first.hash());
    assert_eq!(stored_seal_key_id(&store_one), new_key.id());
    assert_ne!(new_key.id(), record.seal_key_id);

    // A third coordinator with only the new key opens it.
    std::fs::copy(&two_key, three.join(SEAL_KEY_FILE)).unwrap();
    let store_three = open_etcd(&endpoints, "/ca/").unwrap();
    let (third, created) =
        CertificateAuthority::load_or_create_shared(&three, &store_three, &seal_keys(&three, None), true).unwrap();
    assert!(!created);
    assert_eq!(third.hash(), first.hash());

    // The first, still with only the old key, no longer opens it, and is told which key it needs.
    std::fs::remove_file(one.join("ca.key")).unwrap();
    std::fs::remove_file(one.join("ca.crt")).unwrap();
    let err = CertificateAuthority::load_or_create_shared(&one, &store_one, &seal_keys(&one, None), true)
        .unwrap_err()
        .to_string();
    println!("with the old seal key only: {err}");
    assert!(err.contains(&new_key.id()) && err.contains(&record.seal_key_id), "{err}");
    assert!(err.contains("copy the seal key file"), "{err}");
}

#[test]
fn coordinators_starting_at_once_on_an_empty_etcd_end_with_one_ca() {
    let cluster = cluster("coordinators_starting_at_once_on_an_empty_etcd_end_with_one_ca");
    let endpoints = cluster.endpoints();
    let root = tempfile::tempdir().unwrap();
    // The operator gave them all the same seal key before their first start.
    let key = root.path().join("seal.key");
    SealKey::create(&key).unwrap();
    let coordinators: Vec<_> = (0..4)
        .map(|i| {
            let dir = state_dir(root.path(), &format!("c{i}"));
            std::fs::copy(&key, dir.join(SEAL_KEY_FILE)).unwrap();
            (dir, open_etcd(&endpoints, "/race/").unwrap())
        })
        .collect();
    let start = std::sync::Arc::new(std::sync::Barrier::new(coordinators.len()));
    let started: Vec<_> = coordinators
        .into_iter()
        .map(|(dir, store)| {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                let (ca, created) =
                    CertificateAuthority::load_or_create_shared(&dir, &store, &seal_keys(&dir, None), true).unwrap();
                (ca.hash(), created, CertificateAuthority::load_or_create(&dir).unwrap().0.hash())
            })
        })
        .collect();
    let results: Vec<_> = started.into_iter().map(|t| t.join().unwrap()).collect();
    println!("{results:?}");
    let stored = open_etcd(&endpoints, "/race/").unwrap().meta::<SealedCa>(CA_META_KEY).unwrap().unwrap();
    let stored = stored.ca_hash("etcd").unwrap();
    for (hash, _, local) in &results {
        assert_eq!((*hash, *local), (stored, stored));
    }
    // Each may have made a CA, but one was stored, and every other took it.
    assert_eq!(results.iter().filter(|(_, created, _)| *created).count(), 1, "{results:?}");
}

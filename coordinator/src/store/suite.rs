//! One test suite for every backend: [`run`] takes a way to open a named, initially empty state
//! (a redb file, an etcd prefix) and checks what callers rely on, whatever holds the records.
//! Test code (built for tests and the `testing` feature only): a failed unwrap is a failed case.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use hexa_shared::names::Pool;
use hexa_shared::spec::NodeSpec;

use super::{Health, NodeRecord, SCHEMA_VERSION, Store, StoreError, TokenRecord, TokenState};

/// Opens the state named by its argument, creating it empty on first use; opening it again (once
/// the earlier store is dropped) must find what was committed.
pub type Open<'a> = &'a dyn Fn(&str) -> Result<Store, StoreError>;

/// One case of the suite.
pub type Case = fn(Open<'_>);

/// The suite's cases, by name.
pub const CASES: &[(&str, Case)] = &[
    ("records_survive_reopening", records_survive_reopening),
    ("a_failed_transaction_writes_nothing", a_failed_transaction_writes_nothing),
    ("a_transaction_sees_its_own_writes", a_transaction_sees_its_own_writes),
    ("one_transaction_commits_every_table_at_once", one_transaction_commits_every_table_at_once),
    ("records_list_in_key_order", records_list_in_key_order),
    ("removed_records_are_gone", removed_records_are_gone),
    ("a_fleet_of_records_is_written_in_one_call", a_fleet_of_records_is_written_in_one_call),
    ("concurrent_writers_lose_no_update", concurrent_writers_lose_no_update),
    ("a_newer_schema_is_refused", a_newer_schema_is_refused),
];

/// Runs every case, each on its own state, printing each name as it passes.
pub fn run(open: Open<'_>) {
    for (name, case) in CASES {
        case(&|state: &str| open(&format!("{name}-{state}")));
        println!("store suite: {name} ok");
    }
}

pub fn token(id: &str) -> TokenRecord {
    TokenRecord {
        id: id.into(),
        secret_sha256: "00".into(),
        pool: Pool::Shared,
        description: String::new(),
        node_class: None,
        created_at_unix: 1,
        expires_at_unix: 2,
        state: TokenState::Active,
        reenroll: None,
        provider: None,
    }
}

pub fn node(name: &str) -> NodeRecord {
    NodeRecord {
        name: name.into(),
        pool: Pool::Shared,
        hostname: name.into(),
        machine_id: format!("machine-{name}"),
        provider: hexa_shared::proto::ProviderIdentity::None,
        enrolled_at_unix: 1,
        token_id: "abcdef".into(),
        cert_serial: "01".into(),
        previous_cert_serial: None,
        cert_not_after_unix: 2,
        health: Health::Pending,
        health_since_unix: 1,
        spec: NodeSpec::build(name, &Pool::Shared, 1, Vec::new()),
        cordoned: false,
        node_class: None,
        address: None,
        revoked_at_unix: None,
    }
}

fn records_survive_reopening(open: Open<'_>) {
    {
        let store = open("s").unwrap();
        store.write::<_, StoreError>(|tx| tx.put_token(&token("abcdef"))).unwrap();
        store.set_meta("admin", &"hash").unwrap();
        store.put_node(&node("n1")).unwrap();
    }
    let store = open("s").unwrap();
    assert_eq!(store.tokens().unwrap().get("abcdef"), Some(&token("abcdef")));
    assert_eq!(store.meta::<String>("admin").unwrap().as_deref(), Some("hash"));
    assert_eq!(store.nodes().unwrap().get("n1"), Some(&node("n1")));
}

fn a_failed_transaction_writes_nothing(open: Open<'_>) {
    let store = open("s").unwrap();
    let result: Result<(), StoreError> = store.write(|tx| {
        tx.put_token(&token("aaaaaa"))?;
        tx.put_node(&node("n1"))?;
        Err(StoreError::Db("boom".into()))
    });
    assert!(result.is_err());
    assert!(store.tokens().unwrap().is_empty());
    assert!(store.nodes().unwrap().is_empty());
}

fn a_transaction_sees_its_own_writes(open: Open<'_>) {
    let store = open("s").unwrap();
    store.put_node(&node("old")).unwrap();
    store
        .write::<_, StoreError>(|tx| {
            assert_eq!(tx.token("aaaaaa")?, None);
            tx.put_token(&token("aaaaaa"))?;
            assert_eq!(tx.token("aaaaaa")?, Some(token("aaaaaa")));
            tx.put_node(&node("new"))?;
            tx.remove_node("old")?;
            assert_eq!(tx.node("old")?, None);
            assert_eq!(tx.node_names()?, vec!["new".to_string()]);
            // Not visible outside until it commits.
            assert!(store.tokens()?.is_empty());
            Ok(())
        })
        .unwrap();
    assert_eq!(store.nodes().unwrap().keys().collect::<Vec<_>>(), ["new"]);
    assert_eq!(store.tokens().unwrap().len(), 1);
}

fn one_transaction_commits_every_table_at_once(open: Open<'_>) {
    let store = open("s").unwrap();
    store
        .write::<_, StoreError>(|tx| {
            for i in 0..50 {
                tx.put_token(&token(&format!("t{i:05}")))?;
                tx.put_node(&node(&format!("n{i:03}")))?;
            }
            tx.set_meta("pins", &vec![1, 2, 3])
        })
        .unwrap();
    assert_eq!(store.tokens().unwrap().len(), 50);
    assert_eq!(store.nodes().unwrap().len(), 50);
    assert_eq!(store.meta::<Vec<u32>>("pins").unwrap(), Some(vec![1, 2, 3]));
}

fn records_list_in_key_order(open: Open<'_>) {
    let store = open("s").unwrap();
    // More than one page of an etcd range, written in an order that is not the keys'.
    let names: Vec<String> = (0..600).rev().map(|i| format!("node-{i:04}")).collect();
    for chunk in names.chunks(100) {
        store
            .write::<_, StoreError>(|tx| {
                for name in chunk {
                    tx.put_node(&node(name))?;
                }
                Ok(())
            })
            .unwrap();
    }
    let listed: Vec<String> = store.nodes().unwrap().into_keys().collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(listed, sorted);
    let in_tx = store.write::<_, StoreError>(|tx| tx.node_names()).unwrap();
    assert_eq!(in_tx, sorted);
    // Tables do not bleed into each other.
    assert!(store.tokens().unwrap().is_empty() && store.vms().unwrap().is_empty());
}

fn a_fleet_of_records_is_written_in_one_call(open: Open<'_>) {
    let store = open("s").unwrap();
    // More than etcd takes in one transaction by default (128 operations).
    let fleet: Vec<NodeRecord> = (0..500).map(|i| node(&format!("node-{i:04}"))).collect();
    store.put_nodes(&fleet).unwrap();
    let listed: Vec<NodeRecord> = store.nodes().unwrap().into_values().collect();
    assert_eq!(listed, fleet);
    store.put_nodes(&[]).unwrap();
}

fn removed_records_are_gone(open: Open<'_>) {
    let store = open("s").unwrap();
    store.write::<_, StoreError>(|tx| tx.put_token(&token("aaaaaa"))).unwrap();
    store.put_node(&node("n1")).unwrap();
    store
        .write::<_, StoreError>(|tx| {
            tx.remove_token("aaaaaa")?;
            tx.remove_node("n1")?;
            // Removing what is not there is no error.
            tx.remove_tenant("nobody")
        })
        .unwrap();
    assert!(store.tokens().unwrap().is_empty() && store.nodes().unwrap().is_empty());
    drop(store);
    let store = open("s").unwrap();
    assert!(store.tokens().unwrap().is_empty() && store.nodes().unwrap().is_empty());
}

fn concurrent_writers_lose_no_update(open: Open<'_>) {
    let store = open("s").unwrap();
    let (threads, rounds) = (4, 25);
    std::thread::scope(|scope| {
        for t in 0..threads {
            let store = store.clone();
            scope.spawn(move || {
                for r in 0..rounds {
                    store
                        .write::<_, StoreError>(|tx| {
                            let count: u64 = tx.meta("count")?.unwrap_or(0);
                            tx.set_meta("count", &(count + 1))?;
                            tx.put_token(&token(&format!("t{t}r{r:03}")))
                        })
                        .unwrap();
                }
            });
        }
    });
    assert_eq!(store.meta::<u64>("count").unwrap(), Some(threads * rounds));
    let ids: BTreeSet<String> = store.tokens().unwrap().into_keys().collect();
    assert_eq!(ids.len() as u64, threads * rounds);
}

fn a_newer_schema_is_refused(open: Open<'_>) {
    open("s").unwrap().set_meta("schema_version", &(SCHEMA_VERSION + 1)).unwrap();
    let err = open("s").unwrap_err().to_string();
    assert!(err.contains("newer") && err.contains(&format!("schema version {}", SCHEMA_VERSION + 1)), "{err}");
}

//! Tenants created by several clients at once, as fast as the coordinator answers, for tests that
//! kill a coordinator in the middle and then check what it acknowledged.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::admin::AdminClient;

/// Clients creating tenants named `t<client>-<i>`, one request at a time each.
#[derive(Debug)]
pub struct CreateBurst {
    acked: Arc<Mutex<BTreeSet<String>>>,
    in_doubt: Arc<Mutex<BTreeSet<String>>>,
    clients: Vec<JoinHandle<()>>,
}

/// What a burst's coordinator was asked to create: acknowledged (201), and in doubt (sent, no
/// answer: the coordinator died with it in flight, so it may or may not exist).
#[derive(Debug)]
pub struct Outcome {
    pub acked: BTreeSet<String>,
    pub in_doubt: BTreeSet<String>,
}

impl CreateBurst {
    /// Starts `clients` clients, each creating up to `per_client` tenants with `plan`. A client
    /// whose create gets no answer stops there; any answer but 201 fails the test.
    pub fn start(admin: &AdminClient, clients: usize, per_client: usize, plan: Value) -> CreateBurst {
        let acked = Arc::new(Mutex::new(BTreeSet::new()));
        let in_doubt = Arc::new(Mutex::new(BTreeSet::new()));
        let clients = (0..clients)
            .map(|client| {
                let (acked, in_doubt, admin, plan) = (acked.clone(), in_doubt.clone(), admin.clone(), plan.clone());
                tokio::spawn(async move {
                    for i in 0..per_client {
                        let name = format!("t{client}-{i}");
                        let body = json!({"name": name, "plan": plan});
                        match admin.request_raw(reqwest::Method::POST, "/v1/tenants", Some(body)).await {
                            Ok((201, _)) => {
                                acked.lock().unwrap_or_else(|p| p.into_inner()).insert(name);
                            }
                            Ok((status, body)) => panic!("create {name}: HTTP {status} {body}"),
                            Err(_) => {
                                in_doubt.lock().unwrap_or_else(|p| p.into_inner()).insert(name);
                                return;
                            }
                        }
                    }
                })
            })
            .collect();
        CreateBurst { acked, in_doubt, clients }
    }

    pub fn acked_count(&self) -> usize {
        self.acked.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Waits for every client to stop (its coordinator gone, or all its creates done).
    pub async fn finish(self) -> Outcome {
        for client in self.clients {
            if let Err(e) = client.await {
                std::panic::resume_unwind(e.into_panic());
            }
        }
        let take = |set: &Arc<Mutex<BTreeSet<String>>>| set.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Outcome { acked: take(&self.acked), in_doubt: take(&self.in_doubt) }
    }
}

impl Outcome {
    /// Checks `listed`, the tenant names a coordinator lists afterwards: each once, every
    /// acknowledged one there, nothing that was not sent.
    pub fn check(&self, listed: &[&str]) {
        let unique: BTreeSet<&str> = listed.iter().copied().collect();
        assert_eq!(listed.len(), unique.len(), "a tenant is listed twice: {listed:?}");
        for name in &self.acked {
            assert!(unique.contains(name.as_str()), "acknowledged tenant {name} lost");
        }
        for name in &unique {
            assert!(
                self.acked.contains(*name) || self.in_doubt.contains(*name),
                "tenant {name} exists though no create of it was sent"
            );
        }
    }
}

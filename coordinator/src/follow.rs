//! What a coordinator does while another one leads (several sharing one etcd): it keeps up with
//! who leads, sends agents there ([`crate::link::serve_following`]) and serves the admin API as a
//! follower ([`crate::admin::follower_router`]): reads of stored records from the store, the rest
//! forwarded to the leader. It makes no decision and writes nothing.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::CoordinatorConfig;
use crate::store::Store;

/// How often a follower asks etcd who leads.
pub const LEADER_POLL: Duration = Duration::from_millis(500);

/// What a coordinator campaigns with: where agents and admin clients reach it once it leads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advertised {
    /// The QUIC listener, `HOST:PORT`.
    pub quic: String,
    /// The admin API, `HOST:PORT` (plain HTTP).
    pub admin: String,
    pub host: String,
    pub pid: u32,
}

impl Advertised {
    pub fn of(config: &CoordinatorConfig) -> Advertised {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
        Advertised {
            quic: config.advertised(config.quic_listen),
            admin: config.advertised(config.admin_listen),
            host,
            pid: std::process::id(),
        }
    }
}

/// Who leads, as a follower last heard it, or why it cannot say (no leader yet, etcd not
/// answering).
pub type LeaderView = Result<Advertised, String>;

/// Asks `store` who leads every [`LEADER_POLL`] until `stop` changes, publishing each answer.
pub fn watch_leader(store: Store, mut stop: watch::Receiver<bool>) -> watch::Receiver<LeaderView> {
    let (publish, view) = watch::channel(Err("not asked yet".to_string()));
    tokio::spawn(async move {
        loop {
            let asking = store.clone();
            let answer = tokio::task::spawn_blocking(move || asking.leader()).await;
            let now = match answer {
                Ok(Ok(Some(who))) => serde_json::from_str::<Advertised>(&who)
                    .map_err(|e| format!("the leader's record cannot be read ({e}): {who}")),
                Ok(Ok(None)) => Err(format!("no coordinator leads on {} now", store.location())),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(format!("the leader lookup failed: {e}")),
            };
            publish.send_if_modified(|held| {
                let changed = *held != now;
                *held = now.clone();
                changed
            });
            tokio::select! {
                _ = tokio::time::sleep(LEADER_POLL) => {}
                _ = stop.changed() => break,
            }
        }
    });
    view
}

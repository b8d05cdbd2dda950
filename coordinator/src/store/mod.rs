//! Durable state: bootstrap tokens (hashed), node identities and health transitions, tenants and
//! their placements, the Proxmox VMs of dedicated tenants, and metadata such as the admin token
//! hash. One interface, two backends:
//!
//! - [`redb`](self::redb): one file in the state directory, the default for one machine;
//! - [`etcd`](self::etcd): an etcd cluster, for operators who run more than one coordinator.
//!
//! Callers see tables of JSON records and [`Store::write`], which runs a closure in one
//! transaction: what it writes is committed atomically, and durably before `write` returns (a
//! `kill -9` loses nothing that was acknowledged), or not at all when the closure fails. Writes of
//! one process are serialised, as they were in the redb file; reads the closure makes see its own
//! writes.
//!
//! Values are JSON so that records can gain fields (with serde defaults) without a migration.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use hexa_shared::names::Pool;
use hexa_shared::proto::ProviderIdentity;
use hexa_shared::spec::NodeSpec;
use hexa_shared::tenant::Tenant;

use crate::config::ConfigError;

pub mod etcd;
pub mod redb;
#[cfg(any(test, feature = "testing"))]
pub mod suite;

/// Bumped when a change needs a migration; a newer store is refused instead of misread.
const SCHEMA_VERSION: u64 = 1;

/// The tables, by the names both backends store them under (redb table names; etcd key segments).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Meta,
    Tokens,
    Nodes,
    Tenants,
    /// Proxmox VMs of dedicated tenants, by record id ([`crate::proxmox::VmRecord`]).
    Vms,
}

impl Table {
    pub const ALL: [Table; 5] = [Table::Meta, Table::Tokens, Table::Nodes, Table::Tenants, Table::Vms];

    pub fn name(self) -> &'static str {
        match self {
            Table::Meta => "meta",
            Table::Tokens => "tokens",
            Table::Nodes => "nodes",
            Table::Tenants => "tenants",
            Table::Vms => "vms",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("state database: {0}")]
    Db(String),
    #[error("state store etcd ({endpoints}): {message}")]
    Etcd { endpoints: String, message: String },
    #[error(
        "state store etcd ({endpoints}): the records this transaction read changed before it committed \
         (another coordinator wrote them); nothing was written: try again"
    )]
    Conflict { endpoints: String },
    #[error(
        "state store etcd ({endpoints}): this coordinator no longer leads (its lease expired or was revoked, \
         and another may lead now); nothing was written"
    )]
    NotLeader { endpoints: String },
    #[error("state database record {key:?} is corrupt: {message}")]
    Corrupt { key: String, message: String },
    #[error(
        "state store {location} has schema version {found}, newer than this coordinator's {SCHEMA_VERSION}: run a newer coordinator"
    )]
    TooNew { location: String, found: u64 },
}

/// A value as a backend holds it, with the version a transaction's commit can be conditioned on
/// (etcd's mod revision; redb, whose writers this process serialises, keeps none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub version: i64,
}

/// What one transaction commits: every write, and the versions of the records it read (0: absent),
/// which must still hold for the writes to apply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    pub read: BTreeMap<(Table, String), i64>,
    /// `None` deletes the key.
    pub writes: BTreeMap<(Table, String), Option<Vec<u8>>>,
    /// The commit need not wait for the disk (see [`Store::write_unflushed`]); a backend whose every
    /// commit is replicated before it answers (etcd) ignores it.
    pub unflushed: bool,
}

/// The backend under [`Store`]: ordered tables of string keys and byte values, committed reads,
/// and one atomic multi-key write.
pub trait Backend: Send + Sync + std::fmt::Debug {
    fn get(&self, table: Table, key: &str) -> Result<Option<Versioned>, StoreError>;
    /// Every record of `table`, in key order, from one consistent view.
    fn range(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Applies every write of `batch` or none; refuses it with [`StoreError::Conflict`] when a
    /// record it read has changed. Returns once the writes are durable.
    fn commit(&self, batch: Batch) -> Result<(), StoreError>;
    /// Waits until this process leads the coordinators sharing the state, and from then on
    /// conditions every commit on still leading. A backend with one writer (redb) leads at once.
    fn campaign(&self, who: &str, ttl: Duration) -> Result<Leadership, StoreError> {
        let _ = (who, ttl);
        Ok(Leadership { key: String::new(), revision: 0, lease: 0, ended: None })
    }
    /// What the leader campaigned with (its `who`), if one leads; `None` where one process
    /// always leads (redb).
    fn leader(&self) -> Result<Option<String>, StoreError> {
        Ok(None)
    }
    /// Where the state lives, for messages.
    fn location(&self) -> String;
}

/// This process's leadership: on etcd the election's leader key, its create revision (what every
/// commit is fenced on) and the lease that keeps it.
#[derive(Debug, Clone)]
pub struct Leadership {
    pub key: String,
    pub revision: i64,
    pub lease: i64,
    /// Turns true (or its sender goes) once the lease is no longer kept; `None` where the one
    /// process always leads (redb).
    pub ended: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Leadership {
    /// Resolves once this process no longer leads: its lease lapsed or was revoked, or etcd did not
    /// confirm it for a whole TTL (then another coordinator may already lead, and this one's writes
    /// are refused). Never on redb.
    pub async fn lost(&self) {
        match &self.ended {
            None => std::future::pending().await,
            Some(ended) => {
                let mut ended = ended.clone();
                // An error means the keeper is gone, which ends the leadership as well.
                let _ = ended.wait_for(|ended| *ended).await;
            }
        }
    }
}

/// Which backend `[store]` selects.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// `state.redb` in the state directory.
    #[default]
    Redb,
    Etcd,
}

/// Records per commit in [`Store::put_nodes`]: under etcd's default transaction limit with room for
/// the compares and the leader fence a commit carries.
const INDEPENDENT_PUTS_PER_COMMIT: usize = 64;

/// `[store]` of the coordinator's configuration.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    pub backend: BackendKind,
    /// etcd client URLs, `http://HOST:2379` or `https://HOST:2379`.
    pub endpoints: Vec<String>,
    /// PEM CA bundle that signed the etcd members' certificates (https endpoints).
    pub ca_file: String,
    /// PEM client certificate and key, for etcd members that ask for one.
    pub cert_file: String,
    pub key_file: String,
    /// Every key the coordinator writes starts with it.
    pub prefix: String,
    /// How long a start waits for etcd to answer at all.
    #[serde(with = "humantime_serde")]
    pub dial_timeout: Duration,
    /// How long one read or write may take before it fails (no quorum, a partition).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// etcd: the lease of the leader key. A leader that has not renewed it for this long (dead,
    /// stopped, cut off) is replaced; the longest time no coordinator leads after a failure.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// etcd: the file of the key the shared CA's key is sealed with in the store (see
    /// [`crate::ca_seal`]); empty: `<state_dir>/ca-seal.key`.
    pub ca_seal_key_file: String,
    /// etcd, while rotating the seal key: the key the CA was sealed with before; empty: none.
    pub ca_seal_previous_key_file: String,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            backend: BackendKind::Redb,
            endpoints: vec!["http://127.0.0.1:2379".into()],
            ca_file: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
            prefix: "/hexabase/coordinator/".into(),
            dial_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            lease_ttl: Duration::from_secs(5),
            ca_seal_key_file: String::new(),
            ca_seal_previous_key_file: String::new(),
        }
    }
}

impl StoreSettings {
    /// Checks what serde cannot: for etcd, usable endpoints, TLS files named in pairs, a prefix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.backend != BackendKind::Etcd {
            return Ok(());
        }
        let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
        // etcd grants no lease shorter than about 2 s with its default timing, and rounds TTLs
        // to whole seconds.
        let min_ttl = Duration::from_secs(2);
        if self.lease_ttl < min_ttl || self.lease_ttl.subsec_nanos() != 0 {
            return invalid(
                "store.lease_ttl",
                format!(
                    "{} is not a whole number of seconds of at least 2s: write e.g. \"5s\"",
                    humantime::format_duration(self.lease_ttl)
                ),
            );
        }
        if self.endpoints.is_empty() {
            return invalid(
                "store.endpoints",
                "is empty: list the etcd members' client URLs, e.g. [\"http://10.0.0.1:2379\"]".into(),
            );
        }
        let tls = !self.ca_file.is_empty() || !self.cert_file.is_empty();
        for endpoint in &self.endpoints {
            let scheme_ok = endpoint.starts_with("https://") || (!tls && endpoint.starts_with("http://"));
            if !scheme_ok || endpoint.split_once("://").is_none_or(|(_, rest)| rest.is_empty()) {
                let want = if tls {
                    "https://HOST:PORT (ca_file or cert_file is set)"
                } else {
                    "http://HOST:PORT or https://HOST:PORT"
                };
                return invalid("store.endpoints", format!("{endpoint:?} is not an etcd client URL: write {want}"));
            }
        }
        if self.cert_file.is_empty() != self.key_file.is_empty() {
            return invalid("store.cert_file", "and store.key_file go together: set both or neither".into());
        }
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') {
            return invalid(
                "store.prefix",
                format!("{:?} must start and end with /, e.g. \"/hexabase/coordinator/\"", self.prefix),
            );
        }
        if self.dial_timeout.is_zero() {
            return Err(ConfigError::Zero { key: "store.dial_timeout" });
        }
        if self.request_timeout.is_zero() {
            return Err(ConfigError::Zero { key: "store.request_timeout" });
        }
        if !self.ca_seal_previous_key_file.is_empty() && self.ca_seal_previous_key_file == self.ca_seal_key_file {
            return invalid(
                "store.ca_seal_previous_key_file",
                format!(
                    "{:?} is also store.ca_seal_key_file: while rotating the seal key, the new key is \
                     ca_seal_key_file and the old one ca_seal_previous_key_file; otherwise leave \
                     ca_seal_previous_key_file empty",
                    self.ca_seal_previous_key_file
                ),
            );
        }
        Ok(())
    }

    /// The current CA seal key's file: `ca_seal_key_file`, or `<state_dir>/ca-seal.key`.
    pub fn current_seal_key_path(&self, state_dir: &Path) -> PathBuf {
        if self.ca_seal_key_file.is_empty() {
            state_dir.join(crate::ca_seal::SEAL_KEY_FILE)
        } else {
            PathBuf::from(&self.ca_seal_key_file)
        }
    }

    /// [`validate`](Self::validate), and that the TLS files can be read.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.validate()?;
        if self.backend == BackendKind::Etcd {
            for (key, path) in [
                ("store.ca_file", &self.ca_file),
                ("store.cert_file", &self.cert_file),
                ("store.key_file", &self.key_file),
            ] {
                if !path.is_empty() {
                    std::fs::read(path).map_err(|error| ConfigError::UnreadableFile {
                        key,
                        path: path.clone(),
                        error: error.to_string(),
                    })?;
                }
            }
            // The default seal key file is in the state directory, which the coordinator makes its
            // own; a file named here is checked as a start reads it (a missing current key is made
            // by the first coordinator, a missing previous key is an error).
            let invalid =
                |key, error: crate::ca_seal::SealError| ConfigError::Invalid { key, message: error.to_string() };
            if !self.ca_seal_key_file.is_empty() {
                crate::ca_seal::SealKey::read(Path::new(&self.ca_seal_key_file))
                    .map_err(|e| invalid("store.ca_seal_key_file", e))?;
            }
            if !self.ca_seal_previous_key_file.is_empty() {
                let path = Path::new(&self.ca_seal_previous_key_file);
                let found =
                    crate::ca_seal::SealKey::read(path).map_err(|e| invalid("store.ca_seal_previous_key_file", e))?;
                if found.is_none() {
                    return Err(ConfigError::Invalid {
                        key: "store.ca_seal_previous_key_file",
                        message: format!(
                            "{:?} does not exist: point it at the seal key the CA was sealed with before, or \
                             leave it empty",
                            self.ca_seal_previous_key_file
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

/// What happened to a bootstrap token.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TokenState {
    Active,
    Used { node: String, at_unix: i64 },
    Revoked { at_unix: i64 },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    /// Hex sha256 of the token's secret part; the secret itself is never stored.
    pub secret_sha256: String,
    pub pool: Pool,
    #[serde(default)]
    pub description: String,
    /// Class of the dedicated node this token is for (`dedicated:<tenant>` pools).
    #[serde(default)]
    pub node_class: Option<String>,
    pub created_at_unix: i64,
    pub expires_at_unix: i64,
    pub state: TokenState,
    /// Set on re-enrollment tokens (`hexactl node reenroll NAME`): the only token that may enroll
    /// as an existing node, and only as that node, in its pool.
    #[serde(default)]
    pub reenroll: Option<ReenrollBinding>,
    /// Set on the token of a Proxmox VM: it enrolls only the machine presenting this identity.
    #[serde(default)]
    pub provider: Option<ProviderIdentity>,
}

/// The node a re-enrollment token is for.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ReenrollBinding {
    pub node: String,
    /// For a machine the coordinator knows by its provider identity (a Proxmox VM), the identity
    /// the enrolling machine must present; [`ProviderIdentity::None`] binds to the name only.
    pub provider: ProviderIdentity,
}

/// Node health as the inventory judges it from the reports it receives.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, utoipa::ToSchema)]
pub enum Health {
    /// Enrolled (or loaded after a restart) and not heard from yet.
    Pending,
    Ready,
    Unreachable,
    Lost,
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub name: String,
    pub pool: Pool,
    pub hostname: String,
    pub machine_id: String,
    pub provider: ProviderIdentity,
    pub enrolled_at_unix: i64,
    /// Token the node enrolled with.
    pub token_id: String,
    /// Serial (hex) of the certificate the node must present; the previous one stays valid until the
    /// node first connects with the renewed one.
    pub cert_serial: String,
    #[serde(default)]
    pub previous_cert_serial: Option<String>,
    pub cert_not_after_unix: i64,
    pub health: Health,
    pub health_since_unix: i64,
    /// The desired state; its generation only grows.
    pub spec: NodeSpec,
    /// Cordoned nodes get no new shares.
    #[serde(default)]
    pub cordoned: bool,
    /// Class of a dedicated node, from its bootstrap token.
    #[serde(default)]
    pub node_class: Option<String>,
    /// The address the node's link last came from (the K3s server URL of the first server).
    #[serde(default)]
    pub address: Option<std::net::IpAddr>,
    /// When an operator revoked the node's certificate (`hexactl node revoke`): it opens nothing
    /// until the node is enrolled again with a re-enrollment token.
    #[serde(default)]
    pub revoked_at_unix: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    /// One writer at a time, as in the redb file: a transaction's reads stay valid until it commits.
    writer: Arc<Mutex<()>>,
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt { key: key.to_string(), message: e.to_string() })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Our record types serialise infallibly (no maps with non-string keys, no custom errors).
    serde_json::to_vec(value).unwrap_or_default()
}

/// A write transaction handed to [`Store::write`] callers: reads see the committed state and this
/// transaction's own writes; the writes are held until the closure returns and committed together.
pub struct Tx<'a> {
    backend: &'a dyn Backend,
    batch: RefCell<Batch>,
}

impl std::fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tx")
    }
}

impl Tx<'_> {
    fn raw(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let id = (table, key.to_string());
        if let Some(written) = self.batch.borrow().writes.get(&id) {
            return Ok(written.clone());
        }
        let found = self.backend.get(table, key)?;
        self.batch.borrow_mut().read.entry(id).or_insert(found.as_ref().map_or(0, |v| v.version));
        Ok(found.map(|v| v.value))
    }

    fn get<T: DeserializeOwned>(&self, table: Table, key: &str) -> Result<Option<T>, StoreError> {
        self.raw(table, key)?.map(|v| decode(key, &v)).transpose()
    }

    fn put<T: Serialize>(&self, table: Table, key: &str, value: &T) -> Result<(), StoreError> {
        self.batch.borrow_mut().writes.insert((table, key.to_string()), Some(encode(value)));
        Ok(())
    }

    fn remove(&self, table: Table, key: &str) -> Result<(), StoreError> {
        self.batch.borrow_mut().writes.insert((table, key.to_string()), None);
        Ok(())
    }

    pub fn meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        self.get(Table::Meta, key)
    }

    pub fn set_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        self.put(Table::Meta, key, value)
    }

    pub fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.get(Table::Tokens, id)
    }

    pub fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        self.put(Table::Tokens, &token.id, token)
    }

    pub fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        self.get(Table::Nodes, name)
    }

    pub fn put_node(&self, node: &NodeRecord) -> Result<(), StoreError> {
        self.put(Table::Nodes, &node.name, node)
    }

    pub fn put_tenant(&self, tenant: &Tenant) -> Result<(), StoreError> {
        self.put(Table::Tenants, &tenant.name, tenant)
    }

    pub fn tenant(&self, name: &str) -> Result<Option<Tenant>, StoreError> {
        self.get(Table::Tenants, name)
    }

    pub fn remove_node(&self, name: &str) -> Result<(), StoreError> {
        self.remove(Table::Nodes, name)
    }

    pub fn remove_tenant(&self, name: &str) -> Result<(), StoreError> {
        self.remove(Table::Tenants, name)
    }

    pub fn remove_token(&self, id: &str) -> Result<(), StoreError> {
        self.remove(Table::Tokens, id)
    }

    pub fn vm(&self, id: &str) -> Result<Option<crate::proxmox::VmRecord>, StoreError> {
        self.get(Table::Vms, id)
    }

    pub fn put_vm(&self, vm: &crate::proxmox::VmRecord) -> Result<(), StoreError> {
        self.put(Table::Vms, &vm.id, vm)
    }

    pub fn remove_vm(&self, id: &str) -> Result<(), StoreError> {
        self.remove(Table::Vms, id)
    }

    /// The enrolled nodes' names, with this transaction's own additions and removals.
    pub fn node_names(&self) -> Result<Vec<String>, StoreError> {
        let mut names: std::collections::BTreeSet<String> =
            self.backend.range(Table::Nodes)?.into_iter().map(|(key, _)| key).collect();
        for ((table, key), value) in &self.batch.borrow().writes {
            if *table == Table::Nodes {
                match value {
                    Some(_) => names.insert(key.clone()),
                    None => names.remove(key),
                };
            }
        }
        Ok(names.into_iter().collect())
    }
}

impl Store {
    /// Opens (creating if needed) the redb database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::with_backend(Arc::new(redb::RedbBackend::open(path)?))
    }

    /// Opens the store `[store]` configures: the redb file in `state_dir`, or etcd.
    pub fn open_configured(settings: &StoreSettings, state_dir: &Path) -> Result<Store, StoreError> {
        match settings.backend {
            BackendKind::Redb => Store::open(&state_dir.join("state.redb")),
            BackendKind::Etcd => Store::with_backend(Arc::new(etcd::EtcdBackend::connect(settings)?)),
        }
    }

    /// A store over `backend`, once its schema version is one this coordinator reads.
    pub fn with_backend(backend: Arc<dyn Backend>) -> Result<Store, StoreError> {
        let store = Store { backend, writer: Arc::new(Mutex::new(())) };
        let found = store.write(|tx| {
            let found: Option<u64> = tx.get(Table::Meta, "schema_version")?;
            if found.is_none() {
                tx.put(Table::Meta, "schema_version", &SCHEMA_VERSION)?;
            }
            Ok::<_, StoreError>(found.unwrap_or(SCHEMA_VERSION))
        })?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::TooNew { location: store.backend.location(), found });
        }
        Ok(store)
    }

    /// Runs `f` in one write transaction and commits it durably if `f` succeeds.
    pub fn write<T, E: From<StoreError>>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T, E>) -> Result<T, E> {
        self.commit_with(false, f)
    }

    /// Like [`write`](Self::write), but on redb the commit is not flushed to disk: readers see it at
    /// once, the next flushed commit makes it durable with its own, and a crash before that loses it
    /// (the state of the last flushed commit comes back). Only for what a restart recomputes anyway.
    pub fn write_unflushed<T, E: From<StoreError>>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T, E>) -> Result<T, E> {
        self.commit_with(true, f)
    }

    fn commit_with<T, E: From<StoreError>>(
        &self,
        unflushed: bool,
        f: impl FnOnce(&Tx<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        // A writer that panicked left nothing half-written (its batch was never committed).
        let _one_writer = self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let tx = Tx { backend: self.backend.as_ref(), batch: RefCell::new(Batch::default()) };
        let out = f(&tx)?;
        let batch = Batch { unflushed, ..tx.batch.into_inner() };
        if !batch.writes.is_empty() {
            self.backend.commit(batch)?;
        }
        Ok(out)
    }

    fn all<T: DeserializeOwned>(&self, table: Table) -> Result<BTreeMap<String, T>, StoreError> {
        let mut out = BTreeMap::new();
        for (key, value) in self.backend.range(table)? {
            let record = decode(&key, &value)?;
            out.insert(key, record);
        }
        Ok(out)
    }

    pub fn tokens(&self) -> Result<BTreeMap<String, TokenRecord>, StoreError> {
        self.all(Table::Tokens)
    }

    pub fn nodes(&self) -> Result<BTreeMap<String, NodeRecord>, StoreError> {
        self.all(Table::Nodes)
    }

    pub fn tenants(&self) -> Result<BTreeMap<String, Tenant>, StoreError> {
        self.all(Table::Tenants)
    }

    pub fn vms(&self) -> Result<BTreeMap<String, crate::proxmox::VmRecord>, StoreError> {
        self.all(Table::Vms)
    }

    pub fn meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        self.backend.get(Table::Meta, key)?.map(|v| decode(key, &v.value)).transpose()
    }

    pub fn set_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        self.write::<_, StoreError>(|tx| tx.put(Table::Meta, key, value))
    }

    pub fn put_node(&self, node: &NodeRecord) -> Result<(), StoreError> {
        self.write::<_, StoreError>(|tx| tx.put_node(node))
    }

    /// Writes node records that need not change together, a few dozen per commit: a fleet-wide
    /// change costs a flush per chunk instead of one per node, and no commit grows past what etcd
    /// takes in one transaction by default (`--max-txn-ops` 128). A failure leaves the chunks before
    /// it written.
    pub fn put_nodes(&self, nodes: &[NodeRecord]) -> Result<(), StoreError> {
        nodes
            .chunks(INDEPENDENT_PUTS_PER_COMMIT)
            .try_for_each(|chunk| self.write::<_, StoreError>(|tx| chunk.iter().try_for_each(|node| tx.put_node(node))))
    }

    /// Waits until this coordinator leads (an etcd election with a lease of `ttl`; at once on
    /// redb); from then on every write is fenced on the leader key, so once another coordinator
    /// has taken over, this one's writes are refused with [`StoreError::NotLeader`].
    pub fn campaign(&self, who: &str, ttl: Duration) -> Result<Leadership, StoreError> {
        self.backend.campaign(who, ttl)
    }

    /// What the coordinator that leads now campaigned with, if one leads (always `None` on redb).
    pub fn leader(&self) -> Result<Option<String>, StoreError> {
        self.backend.leader()
    }

    /// Where the state lives: the redb file, or the etcd endpoints and prefix.
    pub fn location(&self) -> String {
        self.backend.location()
    }
}

#[cfg(test)]
mod tests {
    use ::redb::{Database, TableDefinition};

    use super::*;

    #[test]
    fn the_store_suite_passes_on_redb() {
        let dir = tempfile::tempdir().unwrap();
        suite::run(&|state: &str| Store::open(&dir.path().join(format!("{state}.redb"))));
    }

    /// A file as the coordinator wrote it before the store had backends (raw redb, the tables and
    /// encoding of that code) opens and reads as it did, and takes writes.
    #[test]
    fn a_state_file_of_the_single_backend_layout_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            for name in ["meta", "tokens", "nodes", "tenants", "vms"] {
                let mut table = txn.open_table(TableDefinition::<&str, &[u8]>::new(name)).unwrap();
                let value = match name {
                    "meta" => serde_json::to_vec(&1u64).unwrap(),
                    "tokens" => serde_json::to_vec(&suite::token("abcdef")).unwrap(),
                    "nodes" => serde_json::to_vec(&suite::node("n1")).unwrap(),
                    _ => continue,
                };
                let key = match name {
                    "meta" => "schema_version",
                    "tokens" => "abcdef",
                    _ => "n1",
                };
                table.insert(key, value.as_slice()).unwrap();
            }
            let mut meta = txn.open_table(TableDefinition::<&str, &[u8]>::new("meta")).unwrap();
            meta.insert("admin_token_sha256", serde_json::to_vec("ab12").unwrap().as_slice()).unwrap();
            drop(meta);
            txn.commit().unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.tokens().unwrap()["abcdef"], suite::token("abcdef"));
        assert_eq!(store.nodes().unwrap()["n1"], suite::node("n1"));
        assert_eq!(store.meta::<String>("admin_token_sha256").unwrap().as_deref(), Some("ab12"));
        store.put_node(&suite::node("n2")).unwrap();
        drop(store);
        // And what the store writes, the old layout reads.
        let db = Database::create(&path).unwrap();
        let txn = ::redb::ReadableDatabase::begin_read(&db).unwrap();
        let nodes = txn.open_table(TableDefinition::<&str, &[u8]>::new("nodes")).unwrap();
        let n2: NodeRecord = serde_json::from_slice(nodes.get("n2").unwrap().unwrap().value()).unwrap();
        assert_eq!(n2, suite::node("n2"));
    }

    #[test]
    fn an_unflushed_write_is_read_at_once_and_made_durable_by_the_next_flushed_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let store = Store::open(&path).unwrap();
            store.write_unflushed::<_, StoreError>(|tx| tx.put_token(&suite::token("bbbbbb"))).unwrap();
            assert_eq!(store.tokens().unwrap().get("bbbbbb"), Some(&suite::token("bbbbbb")));
            store.set_meta("admin", &"hash").unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.tokens().unwrap().get("bbbbbb"), Some(&suite::token("bbbbbb")));
        assert_eq!(store.meta::<String>("admin").unwrap().as_deref(), Some("hash"));
    }

    #[test]
    fn seal_key_files_named_in_the_config_are_checked_as_a_start_reads_them() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name).display().to_string();
        let check = |current: String, previous: String| {
            let settings = StoreSettings {
                backend: BackendKind::Etcd,
                ca_seal_key_file: current,
                ca_seal_previous_key_file: previous,
                ..Default::default()
            };
            settings.check().map_err(|e| e.to_string())
        };
        // The first coordinator makes the current key: a missing one is fine.
        assert_eq!(check(path("new.key"), String::new()), Ok(()));
        crate::ca_seal::SealKey::create(dir.path().join("old.key").as_path()).unwrap();
        assert_eq!(check(path("new.key"), path("old.key")), Ok(()));
        let err = check(path("new.key"), path("gone.key")).unwrap_err();
        assert!(err.starts_with("store.ca_seal_previous_key_file: ") && err.contains("does not exist"), "{err}");
        std::fs::set_permissions(dir.path().join("old.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = check(path("old.key"), String::new()).unwrap_err();
        assert!(err.starts_with("store.ca_seal_key_file: ") && err.contains("mode 0644"), "{err}");
        // Not read at all on redb.
        let redb = StoreSettings { ca_seal_key_file: path("old.key"), ..Default::default() };
        assert_eq!(redb.check(), Ok(()));
    }

    #[test]
    fn etcd_settings_are_checked_only_when_chosen() {
        let etcd = |f: fn(&mut StoreSettings)| {
            let mut settings = StoreSettings { backend: BackendKind::Etcd, ..Default::default() };
            f(&mut settings);
            settings.validate().map_err(|e| e.to_string())
        };
        assert_eq!(etcd(|_| {}), Ok(()));
        let off = StoreSettings { endpoints: Vec::new(), prefix: String::new(), ..Default::default() };
        assert_eq!(off.validate(), Ok(()));
        type Change = fn(&mut StoreSettings);
        let cases: [(Change, &str); 7] = [
            (|s| s.endpoints.clear(), "store.endpoints: is empty"),
            (
                |s| s.endpoints = vec!["127.0.0.1:2379".into()],
                "store.endpoints: \"127.0.0.1:2379\" is not an etcd client URL",
            ),
            (|s| s.ca_file = "/ca.pem".into(), "write https://HOST:PORT (ca_file or cert_file is set)"),
            (|s| s.key_file = "/k.pem".into(), "store.cert_file: and store.key_file go together"),
            (|s| s.prefix = "hexa".into(), "store.prefix: \"hexa\" must start and end with /"),
            (|s| s.request_timeout = Duration::ZERO, "store.request_timeout must be greater than zero"),
            (
                |s| {
                    s.ca_seal_key_file = "/etc/hexabase/seal.key".into();
                    s.ca_seal_previous_key_file = "/etc/hexabase/seal.key".into();
                },
                "store.ca_seal_previous_key_file: \"/etc/hexabase/seal.key\" is also store.ca_seal_key_file",
            ),
        ];
        for (change, expected) in cases {
            let err = etcd(change).unwrap_err();
            assert!(err.starts_with(expected) || err.contains(expected), "got {err}, expected {expected}");
        }
    }
}

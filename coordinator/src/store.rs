//! Durable state in one redb file: bootstrap tokens (hashed), node identities and health
//! transitions, and metadata such as the admin token hash. Each write is one ACID transaction and
//! is on disk when the call returns, so a `kill -9` loses nothing that was acknowledged.
//!
//! Values are JSON so that records can gain fields (with serde defaults) without a migration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use hexa_shared::names::Pool;
use hexa_shared::proto::ProviderIdentity;
use hexa_shared::spec::NodeSpec;
use hexa_shared::tenant::Tenant;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");
const TENANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("tenants");
/// Proxmox VMs of dedicated tenants, by record id ([`crate::proxmox::VmRecord`]).
const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");

/// Bumped when a change needs a migration; a newer file is refused instead of misread.
const SCHEMA_VERSION: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("state database: {0}")]
    Db(String),
    #[error("state database record {key:?} is corrupt: {message}")]
    Corrupt { key: String, message: String },
    #[error(
        "state database {path} has schema version {found}, newer than this coordinator's {SCHEMA_VERSION}: run a newer coordinator"
    )]
    TooNew { path: PathBuf, found: u64 },
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(e.to_string()) }
        }
    )*};
}
db_err!(redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

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
    db: std::sync::Arc<Database>,
    path: PathBuf,
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt { key: key.to_string(), message: e.to_string() })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Our record types serialise infallibly (no maps with non-string keys, no custom errors).
    serde_json::to_vec(value).unwrap_or_default()
}

/// A write transaction handed to [`Store::write`] callers.
pub struct Tx<'a> {
    txn: &'a redb::WriteTransaction,
}

impl std::fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tx")
    }
}

impl Tx<'_> {
    fn get<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let table = self.txn.open_table(table)?;
        let value = table.get(key)?;
        value.map(|v| decode(key, v.value())).transpose()
    }

    fn put<T: Serialize>(&self, table: TableDefinition<&str, &[u8]>, key: &str, value: &T) -> Result<(), StoreError> {
        let mut table = self.txn.open_table(table)?;
        table.insert(key, encode(value).as_slice())?;
        Ok(())
    }

    pub fn meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        self.get(META, key)
    }

    pub fn set_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        self.put(META, key, value)
    }

    pub fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.get(TOKENS, id)
    }

    pub fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        self.put(TOKENS, &token.id, token)
    }

    pub fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        self.get(NODES, name)
    }

    pub fn put_node(&self, node: &NodeRecord) -> Result<(), StoreError> {
        self.put(NODES, &node.name, node)
    }

    pub fn put_tenant(&self, tenant: &Tenant) -> Result<(), StoreError> {
        self.put(TENANTS, &tenant.name, tenant)
    }

    pub fn tenant(&self, name: &str) -> Result<Option<Tenant>, StoreError> {
        self.get(TENANTS, name)
    }

    pub fn remove_node(&self, name: &str) -> Result<(), StoreError> {
        self.txn.open_table(NODES)?.remove(name)?;
        Ok(())
    }

    pub fn remove_tenant(&self, name: &str) -> Result<(), StoreError> {
        self.txn.open_table(TENANTS)?.remove(name)?;
        Ok(())
    }

    pub fn remove_token(&self, id: &str) -> Result<(), StoreError> {
        self.txn.open_table(TOKENS)?.remove(id)?;
        Ok(())
    }

    pub fn vm(&self, id: &str) -> Result<Option<crate::proxmox::VmRecord>, StoreError> {
        self.get(VMS, id)
    }

    pub fn put_vm(&self, vm: &crate::proxmox::VmRecord) -> Result<(), StoreError> {
        self.put(VMS, &vm.id, vm)
    }

    pub fn remove_vm(&self, id: &str) -> Result<(), StoreError> {
        self.txn.open_table(VMS)?.remove(id)?;
        Ok(())
    }

    pub fn node_names(&self) -> Result<Vec<String>, StoreError> {
        let table = self.txn.open_table(NODES)?;
        let mut names = Vec::new();
        for entry in table.iter()? {
            let (key, _) = entry?;
            names.push(key.value().to_string());
        }
        Ok(names)
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err =
            |e: &dyn std::fmt::Display| StoreError::Open { path: path.to_path_buf(), message: e.to_string() };
        let db = Database::create(path).map_err(|e| open_err(&e))?;
        let store = Store { db: std::sync::Arc::new(db), path: path.to_path_buf() };
        let found = store.write(|tx| {
            // Creating every table up front lets readers open them without special cases.
            tx.txn.open_table(TOKENS)?;
            tx.txn.open_table(NODES)?;
            tx.txn.open_table(TENANTS)?;
            tx.txn.open_table(VMS)?;
            let found: Option<u64> = tx.get(META, "schema_version")?;
            if found.is_none() {
                tx.put(META, "schema_version", &SCHEMA_VERSION)?;
            }
            Ok::<_, StoreError>(found.unwrap_or(SCHEMA_VERSION))
        })?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::TooNew { path: path.to_path_buf(), found });
        }
        Ok(store)
    }

    /// Runs `f` in one write transaction and commits it durably if `f` succeeds.
    pub fn write<T, E: From<StoreError>>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T, E>) -> Result<T, E> {
        let txn = self.db.begin_write().map_err(StoreError::from)?;
        let out = f(&Tx { txn: &txn })?;
        txn.commit().map_err(StoreError::from)?;
        Ok(out)
    }

    /// Like [`write`](Self::write), but the commit is not flushed to disk: readers see it at once,
    /// the next flushed commit makes it durable with its own, and a crash before that loses it (the
    /// state of the last flushed commit comes back). Only for what a restart recomputes anyway.
    pub fn write_unflushed<T, E: From<StoreError>>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T, E>) -> Result<T, E> {
        let mut txn = self.db.begin_write().map_err(StoreError::from)?;
        txn.set_durability(redb::Durability::None).map_err(|e| StoreError::Db(e.to_string()))?;
        let out = f(&Tx { txn: &txn })?;
        txn.commit().map_err(StoreError::from)?;
        Ok(out)
    }

    fn all<T: DeserializeOwned>(&self, table: TableDefinition<&str, &[u8]>) -> Result<BTreeMap<String, T>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(table)?;
        let mut out = BTreeMap::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            out.insert(key.value().to_string(), decode(key.value(), value.value())?);
        }
        Ok(out)
    }

    pub fn tokens(&self) -> Result<BTreeMap<String, TokenRecord>, StoreError> {
        self.all(TOKENS)
    }

    pub fn nodes(&self) -> Result<BTreeMap<String, NodeRecord>, StoreError> {
        self.all(NODES)
    }

    pub fn tenants(&self) -> Result<BTreeMap<String, Tenant>, StoreError> {
        self.all(TENANTS)
    }

    pub fn vms(&self) -> Result<BTreeMap<String, crate::proxmox::VmRecord>, StoreError> {
        self.all(VMS)
    }

    pub fn meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(META)?;
        let value = table.get(key)?;
        value.map(|v| decode(key, v.value())).transpose()
    }

    pub fn set_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        self.write::<_, StoreError>(|tx| tx.put(META, key, value))
    }

    pub fn put_node(&self, node: &NodeRecord) -> Result<(), StoreError> {
        self.write::<_, StoreError>(|tx| tx.put_node(node))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreError::Db(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(id: &str) -> TokenRecord {
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

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let store = Store::open(&path).unwrap();
            store.write::<_, StoreError>(|tx| tx.put_token(&token("abcdef"))).unwrap();
            store.set_meta("admin", &"hash").unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.tokens().unwrap().get("abcdef"), Some(&token("abcdef")));
        assert_eq!(store.meta::<String>("admin").unwrap().as_deref(), Some("hash"));
    }

    #[test]
    fn an_unflushed_write_is_read_at_once_and_made_durable_by_the_next_flushed_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let store = Store::open(&path).unwrap();
            store.write_unflushed::<_, StoreError>(|tx| tx.put_token(&token("bbbbbb"))).unwrap();
            assert_eq!(store.tokens().unwrap().get("bbbbbb"), Some(&token("bbbbbb")));
            store.set_meta("admin", &"hash").unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.tokens().unwrap().get("bbbbbb"), Some(&token("bbbbbb")));
        assert_eq!(store.meta::<String>("admin").unwrap().as_deref(), Some("hash"));
    }

    #[test]
    fn a_failed_transaction_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let result: Result<(), StoreError> = store.write(|tx| {
            tx.put_token(&token("aaaaaa"))?;
            Err(StoreError::Db("boom".into()))
        });
        assert!(result.is_err());
        assert!(store.tokens().unwrap().is_empty());
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        Store::open(&path).unwrap().set_meta("schema_version", &(SCHEMA_VERSION + 1)).unwrap();
        let err = Store::open(&path).unwrap_err().to_string();
        assert!(err.contains("newer"), "{err}");
    }
}

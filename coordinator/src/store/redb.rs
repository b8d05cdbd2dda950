//! The embedded backend: one redb file, one redb table per [`Table`] (keys `&str`, values the
//! records' JSON bytes), the layout the coordinator has always written, so existing `state.redb`
//! files open as they are. A commit is one redb write transaction with immediate durability: on
//! disk when it returns.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Backend, Batch, StoreError, Table, Versioned};

fn definition(table: Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(table.name())
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(e.to_string()) }
        }
    )*};
}
db_err!(redb::Error, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

#[derive(Debug)]
pub struct RedbBackend {
    db: Database,
    path: PathBuf,
}

impl RedbBackend {
    /// Opens (creating if needed) the database at `path`, with every table present.
    pub fn open(path: &Path) -> Result<RedbBackend, StoreError> {
        let open_err =
            |e: &dyn std::fmt::Display| StoreError::Open { path: path.to_path_buf(), message: e.to_string() };
        let db = Database::create(path).map_err(|e| open_err(&e))?;
        // Creating every table up front lets readers open them without special cases.
        let txn = db.begin_write()?;
        for table in Table::ALL {
            txn.open_table(definition(table))?;
        }
        txn.commit()?;
        Ok(RedbBackend { db, path: path.to_path_buf() })
    }
}

impl Backend for RedbBackend {
    fn get(&self, table: Table, key: &str) -> Result<Option<Versioned>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(definition(table))?;
        Ok(table.get(key)?.map(|v| Versioned { value: v.value().to_vec(), version: 0 }))
    }

    fn range(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(definition(table))?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            out.push((key.value().to_string(), value.value().to_vec()));
        }
        Ok(out)
    }

    /// The file has one writer, this process (redb locks it), and [`super::Store::write`] lets one
    /// transaction at a time in: what a batch read cannot have changed, so there is nothing to check.
    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write()?;
        if batch.unflushed {
            txn.set_durability(::redb::Durability::None).map_err(|e| StoreError::Db(e.to_string()))?;
        }
        for ((table, key), value) in &batch.writes {
            let mut table = txn.open_table(definition(*table))?;
            match value {
                Some(value) => {
                    table.insert(key.as_str(), value.as_slice())?;
                }
                None => {
                    table.remove(key.as_str())?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }
}

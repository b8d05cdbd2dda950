//! The record of what the agent installed for K3s: which role and version, the binary's hash, every
//! file with its hash and mode, and the directories it had to create. It is what makes a no-op
//! apply cheap (nothing to download or rehash when the record and the disk agree), tells an
//! upgrade from a reconfiguration, and lets uninstall remove exactly what was installed.
//!
//! It is written before the first change of an apply (listing everything the apply may create,
//! with `restart_pending`) and again once the service has been restarted, so a crash at any point
//! leaves a record that covers every file on disk and a restart that is still owed.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use hexa_shared::fsutil::{self, SECRET_MODE};
use hexa_shared::k3s::RoleKind;

use super::{K3sError, paths};

/// Bumped when the record's meaning changes; an unknown format is refused, not guessed at.
pub const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub format: u32,
    pub role: RoleKind,
    /// The systemd unit, e.g. `k3s.service`.
    pub unit: String,
    /// The K3s release the binary is.
    pub version: String,
    pub binary: BinaryRecord,
    /// Node paths of the files written besides the binary.
    pub files: BTreeMap<PathBuf, FileRecord>,
    /// Directories the agent created, parents first; removed on uninstall when empty.
    pub dirs: Vec<PathBuf>,
    /// The files changed and the service has not been restarted since.
    pub restart_pending: bool,
    /// The unit of the previous role while a reinstall replaces it: still to be stopped and
    /// disabled if the reinstall was interrupted.
    pub retiring_unit: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct BinaryRecord {
    pub path: PathBuf,
    pub sha256: String,
    /// The file's identity when it was last hashed; while it is unchanged the hash is trusted
    /// without reading 70 MiB again.
    pub stamp: Option<FileStamp>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    pub len: u64,
    pub mtime: i64,
    pub mtime_nsec: i64,
    pub ino: u64,
}

impl FileStamp {
    pub fn of(meta: &fs::Metadata) -> FileStamp {
        FileStamp { len: meta.len(), mtime: meta.mtime(), mtime_nsec: meta.mtime_nsec(), ino: meta.ino() }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    pub sha256: String,
    pub mode: u32,
}

/// Reads the record under `root`; `None` when the agent has not installed K3s there.
pub fn load(root: &Path) -> Result<Option<Manifest>, K3sError> {
    let path = paths::under(root, Path::new(paths::MANIFEST));
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(K3sError::Fs(fsutil::FsError { action: "read", path, source: e })),
    };
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| K3sError::CorruptManifest { path: path.clone(), message: e.to_string() })?;
    if manifest.format != FORMAT {
        return Err(K3sError::CorruptManifest {
            path,
            message: format!("format {} is not the format {FORMAT} this agent writes", manifest.format),
        });
    }
    Ok(Some(manifest))
}

/// Writes the record under `root` atomically.
pub fn save(root: &Path, manifest: &Manifest) -> Result<(), K3sError> {
    let path = paths::under(root, Path::new(paths::MANIFEST));
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| {
            K3sError::Fs(fsutil::FsError { action: "create directory", path: dir.to_path_buf(), source: e })
        })?;
    }
    let mut text = serde_json::to_string_pretty(manifest)
        .map_err(|e| K3sError::CorruptManifest { path: path.clone(), message: e.to_string() })?;
    text.push('\n');
    Ok(fsutil::write_atomic(&path, text.as_bytes(), SECRET_MODE)?)
}

/// Removes the record (after an uninstall).
pub fn remove(root: &Path) -> Result<(), K3sError> {
    let path = paths::under(root, Path::new(paths::MANIFEST));
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(K3sError::Fs(fsutil::FsError { action: "remove", path, source: e })),
    }
}

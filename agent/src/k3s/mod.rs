//! K3s on the node: the agent's installer, what an operator would do with K3s' `install.sh`, but
//! declarative, idempotent and verifiable.
//!
//! [`apply`] makes the node match a [`K3sSpec`]: the binary of the pinned version (downloaded or
//! taken from an air-gap directory, checked against the release's sha256 before anything is
//! replaced), `/etc/rancher/k3s/config.yaml`, the systemd unit and its environment file, and the
//! service (re)started through the [`Systemd`] seam. All paths are under an injected root.
//!
//! - A spec that matches what is installed writes nothing, downloads nothing and restarts nothing.
//! - A new version downloads, verifies, swaps the binary and restarts once; a failed download
//!   leaves the installed binary in place and running.
//! - A change of role (server <-> agent) is refused unless the spec's action is `Reinstall`.
//! - `Uninstall` stops and disables the service and removes exactly the files the agent recorded
//!   in its manifest (`/var/lib/hexabase/agent/k3s-installed.json`).
//!
//! [`observe`] turns the installation, the service and the Node's readiness into the [`K3sState`]
//! every report carries.

pub mod fetch;
pub mod host_access;
pub mod kubectl;
pub mod manifest;
pub mod paths;
pub mod readiness;
pub mod render;
pub mod systemd;

#[cfg(test)]
mod apply_tests;
#[cfg(test)]
pub(crate) mod testkit;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tracing::{Instrument, info, warn};

use hexa_shared::fsutil::{self, FsError};
use hexa_shared::k3s::{K3sAction, K3sSpec, K3sSpecError, K3sState, RoleKind};

pub use fetch::{Arch, FetchError, FetchPolicy, Fetcher};
pub use kubectl::{Kubectl, KubectlError, KubectlOutput};
pub use manifest::Manifest;
#[cfg(any(test, feature = "testing"))]
pub use readiness::ScriptedReadiness;
pub use readiness::{KubectlReadiness, NodeReadiness, ReadinessError, wait_ready};
#[cfg(any(test, feature = "testing"))]
pub use systemd::RecordingSystemd;
pub use systemd::{DryRunSystemd, Systemctl, Systemd, SystemdCall, SystemdError};

#[derive(Debug, thiserror::Error)]
pub enum K3sError {
    #[error("invalid K3s spec: {0}")]
    Spec(K3sSpecError),
    #[error(
        "K3s is installed on this node as {installed} ({unit}) and the spec asks for {requested}: \
         changing a node's role replaces its K3s installation; set the spec's action to reinstall to do that"
    )]
    RoleChangeRefused { installed: RoleKind, requested: RoleKind, unit: String },
    #[error("cannot get k3s {version}: {error}; {kept}")]
    Fetch {
        version: String,
        /// Named in the message, so not also the `source`: a printed chain names it once.
        error: FetchError,
        /// What is left running, e.g. "k3s v1.35.4+k3s1 is left installed and running".
        kept: String,
    },
    #[error(
        "the K3s install record {path} cannot be read ({message}): move it aside to let the agent \
         reinstall K3s over what is there"
    )]
    CorruptManifest { path: PathBuf, message: String },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{0}; the files are in place and the next apply retries")]
    Systemd(SystemdError),
}

// Spec and systemd errors are named in the message, so they are not also the error's `source`.
impl From<K3sSpecError> for K3sError {
    fn from(error: K3sSpecError) -> Self {
        K3sError::Spec(error)
    }
}

impl From<SystemdError> for K3sError {
    fn from(error: SystemdError) -> Self {
        K3sError::Systemd(error)
    }
}

impl K3sError {
    /// The state to report after this error.
    pub fn to_state(&self) -> K3sState {
        K3sState::Failed { reason: self.to_string() }
    }
}

/// What an apply changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum K3sChange {
    /// The node already matched the spec.
    Unchanged,
    /// K3s was not installed by the agent before.
    Installed { version: String },
    /// The binary was replaced by another version.
    Upgraded { from: String, to: String },
    /// Config, unit or environment changed (or the binary was repaired); same version.
    Reconfigured,
    /// The installation of the other role was replaced (action `Reinstall`).
    Reinstalled { from: RoleKind },
    /// Nothing changed, but the service was not running and was started.
    Started,
    /// K3s was removed.
    Uninstalled,
    /// Uninstall asked, and the agent had installed nothing.
    NothingToUninstall,
}

/// The result of [`apply`]: what changed, which node paths were written or removed, and the
/// unit restarted, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K3sOutcome {
    pub change: K3sChange,
    pub written: Vec<PathBuf>,
    pub removed: Vec<PathBuf>,
    pub restarted: Option<String>,
}

impl K3sOutcome {
    fn new(change: K3sChange) -> K3sOutcome {
        K3sOutcome { change, written: Vec::new(), removed: Vec::new(), restarted: None }
    }
}

fn fs_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FsError + 'a {
    move |source| FsError { action, path: path.to_path_buf(), source }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Makes K3s on the node under `root` match `spec`. See the module documentation.
pub async fn apply(
    root: &Path,
    spec: &K3sSpec,
    systemd: &dyn Systemd,
    fetcher: &Fetcher,
) -> Result<K3sOutcome, K3sError> {
    let span =
        tracing::info_span!("k3s_apply", role = %spec.role.kind(), version = %spec.version, action = ?spec.action);
    async {
        spec.validate()?;
        if spec.action == K3sAction::Uninstall {
            return uninstall(root, systemd);
        }
        install(root, spec, systemd, fetcher).await
    }
    .instrument(span)
    .await
}

/// The binary the spec needs, once known.
enum BinaryPlan {
    /// The installed binary is the right one.
    Keep { sha256: String },
    /// A verified download waits in `staged`.
    Replace { staged: PathBuf, sha256: String },
}

impl BinaryPlan {
    fn sha256(&self) -> &str {
        match self {
            BinaryPlan::Keep { sha256 } | BinaryPlan::Replace { sha256, .. } => sha256,
        }
    }
}

/// Whether the installed binary is still the one `recorded`: by its stamp when that is unchanged,
/// by its hash otherwise.
async fn binary_is(root: &Path, recorded: &manifest::BinaryRecord) -> Result<bool, K3sError> {
    let path = paths::under(root, &recorded.path);
    let meta = match fs::metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(fs_error("inspect", &path)(e).into()),
    };
    if recorded.stamp == Some(manifest::FileStamp::of(&meta)) {
        return Ok(true);
    }
    Ok(hash_binary(&path).await? == recorded.sha256)
}

async fn hash_binary(path: &Path) -> Result<String, K3sError> {
    fetch::sha256_file(path).await.map_err(|e| match e {
        FetchError::Io { action, path, error } => FsError { action, path, source: error }.into(),
        other => FsError { action: "hash", path: path.to_path_buf(), source: std::io::Error::other(other.to_string()) }
            .into(),
    })
}

/// Decides about the binary, fetching and verifying a new one when needed. Touches nothing outside
/// the download directory.
async fn plan_binary(
    root: &Path,
    spec: &K3sSpec,
    installed: Option<&Manifest>,
    fetcher: &Fetcher,
) -> Result<BinaryPlan, K3sError> {
    if let Some(m) = installed.filter(|m| m.version == spec.version) {
        if binary_is(root, &m.binary).await? {
            return Ok(BinaryPlan::Keep { sha256: m.binary.sha256.clone() });
        }
        warn!(path = paths::BINARY, "the installed k3s binary is not the one the agent installed; replacing it");
    }
    let kept = match installed {
        Some(m) => format!("k3s {} is left installed as it was", m.version),
        None => "nothing was installed".to_string(),
    };
    let fetch_failed = |error: FetchError| K3sError::Fetch { version: spec.version.clone(), error, kept: kept.clone() };
    let expected = fetcher.expected_sha256(root, &spec.artifacts, &spec.version).await.map_err(fetch_failed)?;
    let bin = paths::under(root, Path::new(paths::BINARY));
    if bin.exists() && hash_binary(&bin).await? == expected {
        return Ok(BinaryPlan::Keep { sha256: expected });
    }
    let download_dir = paths::under(root, Path::new(paths::DOWNLOAD_DIR));
    let staged = fetcher
        .fetch_binary(root, &spec.artifacts, &spec.version, &expected, &download_dir)
        .await
        .map_err(fetch_failed)?;
    Ok(BinaryPlan::Replace { staged, sha256: expected })
}

/// Missing ancestors of `files` under `root`, parents first: the directories an apply creates.
fn missing_dirs<'a>(root: &Path, files: impl IntoIterator<Item = &'a Path>) -> Vec<PathBuf> {
    let mut missing = Vec::new();
    for file in files {
        let mut ancestors: Vec<&Path> = file.ancestors().skip(1).filter(|a| a.parent().is_some()).collect();
        ancestors.reverse();
        for dir in ancestors {
            if !paths::under(root, dir).exists() && !missing.iter().any(|m: &PathBuf| m == dir) {
                missing.push(dir.to_path_buf());
            }
        }
    }
    missing
}

/// Copies a verified download over `dest` atomically: a temporary file beside it with the
/// binary's mode, fsynced, renamed into place, the directory fsynced.
fn install_binary(staged: &Path, dest: &Path) -> Result<(), FsError> {
    let dir = dest.parent().unwrap_or(Path::new("/"));
    let tmp = dir.join(format!(".k3s.tmp-{}", std::process::id()));
    let result = (|| {
        let mut source = fs::File::open(staged).map_err(fs_error("open", staged))?;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(render::BINARY_MODE)
            .open(&tmp)
            .map_err(fs_error("create", &tmp))?;
        file.set_permissions(fs::Permissions::from_mode(render::BINARY_MODE)).map_err(fs_error("chmod", &tmp))?;
        std::io::copy(&mut source, &mut file).map_err(fs_error("write", &tmp))?;
        file.flush().map_err(fs_error("write", &tmp))?;
        file.sync_all().map_err(fs_error("fsync", &tmp))?;
        fs::rename(&tmp, dest).map_err(fs_error("rename into place", dest))?;
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(fs_error("fsync directory", dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

async fn install(
    root: &Path,
    spec: &K3sSpec,
    systemd: &dyn Systemd,
    fetcher: &Fetcher,
) -> Result<K3sOutcome, K3sError> {
    let installed = manifest::load(root)?;
    let role = spec.role.kind();
    let unit = render::unit_name(role);
    if let Some(m) = &installed
        && m.role != role
        && spec.action != K3sAction::Reinstall
    {
        return Err(K3sError::RoleChangeRefused { installed: m.role, requested: role, unit: m.unit.clone() });
    }

    // Everything that can fail for reasons outside the node happens before anything is changed.
    let binary = plan_binary(root, spec, installed.as_ref(), fetcher).await?;

    let desired = render::desired_files(spec);
    let mut writes = Vec::new();
    let mut chmods = Vec::new();
    for file in &desired {
        let host = paths::under(root, &file.path);
        match fs::read(&host) {
            Ok(bytes) if bytes == file.contents.as_bytes() => {
                let mode = fs::metadata(&host).map_err(fs_error("inspect", &host))?.permissions().mode() & 0o7777;
                if mode != file.mode {
                    chmods.push(file);
                }
            }
            Ok(_) => writes.push(file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => writes.push(file),
            Err(e) => return Err(fs_error("read", &host)(e).into()),
        }
    }
    let records: BTreeMap<PathBuf, manifest::FileRecord> = desired
        .iter()
        .map(|f| (f.path.clone(), manifest::FileRecord { sha256: sha256_hex(f.contents.as_bytes()), mode: f.mode }))
        .collect();
    let old_files = installed.as_ref().map(|m| m.files.clone()).unwrap_or_default();
    let stale: Vec<PathBuf> = old_files.keys().filter(|p| !records.contains_key(*p)).cloned().collect();
    let old_unit =
        installed.as_ref().and_then(|m| m.retiring_unit.clone().or_else(|| Some(m.unit.clone()))).filter(|u| u != unit);
    let replacing = matches!(binary, BinaryPlan::Replace { .. });

    // What K3s runs with differs from what it was last (re)started with.
    let changed = match &installed {
        None => true,
        Some(m) => {
            m.restart_pending
                || m.unit != unit
                || m.binary.sha256 != binary.sha256()
                || m.files.len() != records.len()
                || m.files.iter().zip(&records).any(|((p1, r1), (p2, r2))| p1 != p2 || r1.sha256 != r2.sha256)
        }
    };
    let active = systemd.is_active(unit)?;
    let restart = changed || replacing || !active;
    let touches_files = replacing || !writes.is_empty() || !chmods.is_empty() || !stale.is_empty();

    let binary_path = PathBuf::from(paths::BINARY);
    let mut new_dirs = missing_dirs(root, writes.iter().map(|f| f.path.as_path()));
    if replacing {
        for dir in missing_dirs(root, [binary_path.as_path()]) {
            if !new_dirs.contains(&dir) {
                new_dirs.push(dir);
            }
        }
    }
    let mut dirs = installed.as_ref().map(|m| m.dirs.clone()).unwrap_or_default();
    dirs.extend(new_dirs.iter().filter(|d| !dirs.contains(d)).cloned().collect::<Vec<_>>());

    let mut outcome = K3sOutcome::new(match &installed {
        None => K3sChange::Installed { version: spec.version.clone() },
        Some(m) if m.role != role => K3sChange::Reinstalled { from: m.role },
        Some(m) if m.version != spec.version && replacing => {
            K3sChange::Upgraded { from: m.version.clone(), to: spec.version.clone() }
        }
        Some(_) if touches_files || changed => K3sChange::Reconfigured,
        Some(_) if restart => K3sChange::Started,
        Some(_) => K3sChange::Unchanged,
    });

    if touches_files {
        // Record first what this apply may create, so that a crash leaves nothing unaccounted for.
        let mut intent_files = old_files.clone();
        intent_files.extend(records.clone());
        manifest::save(
            root,
            &Manifest {
                format: manifest::FORMAT,
                role,
                unit: unit.to_string(),
                version: spec.version.clone(),
                binary: manifest::BinaryRecord {
                    path: binary_path.clone(),
                    sha256: binary.sha256().to_string(),
                    stamp: None,
                },
                files: intent_files,
                dirs: dirs.clone(),
                restart_pending: true,
                retiring_unit: old_unit.clone(),
            },
        )?;
    }
    for dir in &new_dirs {
        let host = paths::under(root, dir);
        match fs::create_dir(&host) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(fs_error("create directory", &host)(e).into()),
        }
    }
    let bin_host = paths::under(root, &binary_path);
    if let BinaryPlan::Replace { staged, sha256 } = &binary {
        install_binary(staged, &bin_host)?;
        let _ = fs::remove_file(staged);
        info!(path = paths::BINARY, sha256 = %sha256, "installed k3s binary");
        outcome.written.push(binary_path.clone());
    }
    for file in &writes {
        fsutil::write_atomic(&paths::under(root, &file.path), file.contents.as_bytes(), file.mode)?;
        info!(path = %file.path.display(), "wrote");
        outcome.written.push(file.path.clone());
    }
    for file in &chmods {
        let host = paths::under(root, &file.path);
        fs::set_permissions(&host, fs::Permissions::from_mode(file.mode)).map_err(fs_error("chmod", &host))?;
    }
    if let Some(old_unit) = &old_unit {
        info!(unit = %old_unit, "stopping the unit of the previous role");
        retire(root, systemd, old_unit)?;
    }
    for path in &stale {
        let host = paths::under(root, path);
        match fs::remove_file(&host) {
            Ok(()) => outcome.removed.push(path.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fs_error("remove", &host)(e).into()),
        }
    }
    let unit_path = render::unit_path(role);
    let env_path = render::env_path(role);
    let unit_files_changed = !stale.is_empty() || writes.iter().any(|f| f.path == unit_path || f.path == env_path);
    if unit_files_changed {
        systemd.daemon_reload()?;
    }
    if writes.iter().any(|f| f.path == unit_path) {
        systemd.enable(unit)?;
    }
    if restart {
        info!(unit, changed, replaced_binary = replacing, was_active = active, "restarting k3s");
        systemd.restart(unit)?;
        outcome.restarted = Some(unit.to_string());
    }

    let stamp = fs::metadata(&bin_host).ok().map(|meta| manifest::FileStamp::of(&meta));
    let applied = Manifest {
        format: manifest::FORMAT,
        role,
        unit: unit.to_string(),
        version: spec.version.clone(),
        binary: manifest::BinaryRecord { path: binary_path, sha256: binary.sha256().to_string(), stamp },
        files: records,
        dirs,
        restart_pending: false,
        retiring_unit: None,
    };
    if installed.as_ref() != Some(&applied) {
        manifest::save(root, &applied)?;
    }
    Ok(outcome)
}

/// Stops `unit` and, while its unit file is there, disables it (systemctl cannot disable a unit
/// whose file is gone, and an interrupted apply may already have removed it).
fn retire(root: &Path, systemd: &dyn Systemd, unit: &str) -> Result<(), K3sError> {
    systemd.stop(unit)?;
    if paths::under(root, &Path::new(paths::SYSTEMD_DIR).join(unit)).exists() {
        systemd.disable(unit)?;
    }
    Ok(())
}

/// Stops and disables the unit, removes the files the manifest lists, the agent's leftover
/// downloads and the directories it created (when empty), then the manifest.
fn uninstall(root: &Path, systemd: &dyn Systemd) -> Result<K3sOutcome, K3sError> {
    let Some(m) = manifest::load(root)? else {
        info!("K3s was not installed by the agent; nothing to uninstall");
        return Ok(K3sOutcome::new(K3sChange::NothingToUninstall));
    };
    let mut outcome = K3sOutcome::new(K3sChange::Uninstalled);
    for unit in m.retiring_unit.iter().chain([&m.unit]) {
        retire(root, systemd, unit)?;
    }
    let files: BTreeSet<&PathBuf> = m.files.keys().chain([&m.binary.path]).collect();
    for path in files {
        let host = paths::under(root, path);
        match fs::remove_file(&host) {
            Ok(()) => outcome.removed.push(path.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fs_error("remove", &host)(e).into()),
        }
    }
    systemd.daemon_reload()?;
    let downloads = paths::under(root, Path::new(paths::DOWNLOAD_DIR));
    if let Ok(entries) = fs::read_dir(&downloads) {
        for entry in entries.flatten() {
            if entry.path().extension().is_some_and(|e| e == "part") {
                let _ = fs::remove_file(entry.path());
            }
        }
        let _ = fs::remove_dir(&downloads);
    }
    for dir in m.dirs.iter().rev() {
        // Only when empty: whatever else someone put there stays.
        let _ = fs::remove_dir(paths::under(root, dir));
    }
    manifest::remove(root)?;
    info!(unit = %m.unit, version = %m.version, removed = outcome.removed.len(), "uninstalled k3s");
    Ok(outcome)
}

/// K3s' state for the report: not installed (by the agent), failed (the unit is down or its state
/// cannot be read), installing (up, Node not Ready yet) or running with its version.
pub async fn observe(root: &Path, systemd: &dyn Systemd, readiness: &dyn NodeReadiness, node_name: &str) -> K3sState {
    let m = match manifest::load(root) {
        Ok(None) => return K3sState::NotInstalled,
        Ok(Some(m)) => m,
        Err(e) => return e.to_state(),
    };
    match systemd.is_active(&m.unit) {
        Ok(true) => {}
        Ok(false) => {
            return K3sState::Failed {
                reason: format!(
                    "{unit} is not running: see `journalctl -u {unit}`; the next apply starts it again",
                    unit = m.unit
                ),
            };
        }
        Err(e) => return K3sState::Failed { reason: e.to_string() },
    }
    let kubeconfig = paths::under(root, Path::new(paths::kubeconfig(m.role)));
    match readiness.node_ready(&kubeconfig, node_name).await {
        Ok(true) => K3sState::Running { version: m.version, cluster_ca_sha256: cluster_ca_sha256(root, m.role) },
        Ok(false) | Err(_) => K3sState::Installing,
    }
}

/// On a server, the sha256 (hex) of the cluster's server CA file exactly as K3s wrote it: the hash
/// K3s' secure tokens carry (`K10<hash>::...`), which agents then pin when they join.
fn cluster_ca_sha256(root: &Path, role: RoleKind) -> Option<String> {
    use sha2::Digest;
    if role != RoleKind::Server {
        return None;
    }
    let pem = fs::read(paths::under(root, Path::new(paths::SERVER_CA))).ok()?;
    Some(hex::encode(sha2::Sha256::digest(&pem)))
}

/// The record of what the agent installed under `root`, if anything.
pub fn installed(root: &Path) -> Result<Option<Manifest>, K3sError> {
    manifest::load(root)
}

//! Writing state files so that a crash never leaves a half-written one and secrets are never
//! readable by others, not even for a moment.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of files that hold keys and tokens.
pub const SECRET_MODE: u32 = 0o600;
/// Mode of other state files.
pub const PUBLIC_MODE: u32 = 0o644;

#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct FsError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn at<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FsError + 'a {
    move |source| FsError { action, path: path.to_path_buf(), source }
}

/// Writes `contents` to `path` atomically with the given mode: a temporary file created with that
/// mode beside it, fsynced, renamed over `path`, and the directory fsynced.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), FsError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(at("create", &tmp))?;
        // The mode given to open() is filtered by the umask; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode)).map_err(at("chmod", &tmp))?;
        file.write_all(contents).map_err(at("write", &tmp))?;
        file.sync_all().map_err(at("fsync", &tmp))?;
        fs::rename(&tmp, path).map_err(at("rename into place", path))?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(at("fsync directory", dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates `dir` (and parents) if missing and makes it private to the owner.
pub fn ensure_private_dir(dir: &Path) -> Result<(), FsError> {
    fs::create_dir_all(dir).map_err(at("create directory", dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(at("chmod", dir))
}

/// Reads a file to a string, naming the file in the error.
pub fn read_to_string(path: &Path) -> Result<String, FsError> {
    fs::read_to_string(path).map_err(at("read", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_written_private_and_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        write_atomic(&path, b"first", SECRET_MODE).unwrap();
        write_atomic(&path, b"second", SECRET_MODE).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // Nothing but the file itself is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn errors_name_the_path() {
        let err = write_atomic(Path::new("/nonexistent-dir/x"), b"", PUBLIC_MODE).unwrap_err();
        assert!(err.to_string().contains("/nonexistent-dir"), "{err}");
    }
}

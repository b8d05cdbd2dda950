//! One CA for every coordinator sharing an etcd store, kept in the store with its key sealed.
//!
//! Agents trust the one CA they enrolled with, so whichever coordinator leads must issue from the
//! same CA; the store is the one place all of them share. Its key is stored sealed (AES-256-GCM)
//! under a seal key that each coordinator holds in a file of its own (`[store] ca_seal_key_file`,
//! default `<state_dir>/ca-seal.key`), so that whoever can read etcd (its backups, its operators)
//! does not hold the CA key. The certificate is stored in the clear.
//!
//! The record is JSON in the meta table under [`CA_META_KEY`] (`<prefix>meta/ca` on etcd), a
//! [`SealedCa`]: the certificate as PEM, the key sealed (base64 of the 96-bit nonce, the
//! ciphertext and the tag), and the id of the seal key (the first 8 bytes of its sha256, in hex),
//! so that a coordinator with another key can say which key it would need. The additional
//! authenticated data is a label and the sha256 of the certificate's DER: the sealed key opens only
//! beside the certificate it was sealed with.
//!
//! Seal key files hold 64 hex characters (32 bytes), optionally followed by a newline, and must
//! be readable by their owner only. Rotation: the new key as `ca_seal_key_file`, the old one as
//! `ca_seal_previous_key_file`; the leader opens the CA with the old one and seals it again with
//! the new one.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use hexa_shared::fsutil::{self, SECRET_MODE};
use hexa_shared::pki::CaHash;

use crate::bootstrap::{BootstrapError, CertificateAuthority};
use crate::store::{Store, StoreError, StoreSettings};

/// The meta key of the shared CA (`<prefix>meta/ca` on etcd).
pub const CA_META_KEY: &str = "ca";
/// The seal key's file in the state directory when `[store] ca_seal_key_file` is empty.
pub const SEAL_KEY_FILE: &str = "ca-seal.key";
/// Version of [`SealedCa`]'s layout and sealing.
const RECORD_VERSION: u32 = 1;
const KEY_LEN: usize = 32;
/// Prefixed to the certificate's hash in the additional authenticated data.
const AAD_LABEL: &[u8] = b"hexabase coordinator CA key, sealed v1\n";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("CA seal key file {path}: {message}")]
    KeyFile { path: PathBuf, message: String },
    #[error(
        "the CA in {location} is sealed with seal key id {stored_id}, and this coordinator has no seal key \
         file {path}: copy the seal key file of a coordinator that already runs with this store (its [store] \
         ca_seal_key_file, by default <state_dir>/{SEAL_KEY_FILE}) to {path}, mode 0600, and start again (when \
         rotating the seal key, write the new key there first, e.g. `openssl rand -hex 32`)"
    )]
    NoKeyFile { location: String, stored_id: String, path: PathBuf },
    #[error(
        "the CA in {location} is sealed with seal key id {stored_id}, and this coordinator has seal key id \
         {current_id} ({current_path}){}: copy the seal key file of a coordinator that already runs with this \
         store to {current_path}, mode 0600, and start again",
        previous_id.as_ref().map(|id| format!(" and previous seal key id {id}")).unwrap_or_default()
    )]
    WrongKey {
        location: String,
        stored_id: String,
        current_id: String,
        current_path: PathBuf,
        previous_id: Option<String>,
    },
    #[error(
        "the CA in {location} does not open with seal key id {key_id} although it names that key: the record was \
         altered (its sealed key or its certificate); nothing was loaded: restore the record from a backup of the \
         store"
    )]
    Altered { location: String, key_id: String },
    #[error(
        "the CA in {location} ({stored}) is not the CA in {state_dir} ({local}): agents enrolled under one do not \
         trust the other. If no agent was enrolled under {local}, move {state_dir}/ca.crt and ca.key away and \
         start again to take the shared CA; otherwise point this coordinator at the store its agents belong to"
    )]
    OtherCa { location: String, stored: CaHash, state_dir: PathBuf, local: CaHash },
    #[error("the CA record in {location} cannot be read: {message}")]
    BadRecord { location: String, message: String },
    #[error(
        "the store {location} holds no CA yet, and this coordinator does not write to it before it leads: load \
         the CA again once it leads"
    )]
    NotStoredYet { location: String },
    #[error("cannot seal the CA key: {0}")]
    Crypto(String),
}

/// A 256-bit seal key and the file it came from. Its bytes never appear in `Debug`.
#[derive(Clone)]
pub struct SealKey {
    bytes: [u8; KEY_LEN],
    path: PathBuf,
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealKey").field("id", &self.id()).field("path", &self.path).finish_non_exhaustive()
    }
}

impl SealKey {
    /// Reads the seal key at `path`; `None` when there is no such file. A file others may read,
    /// or one that is not 64 hex characters, is refused.
    pub fn read(path: &Path) -> Result<Option<SealKey>, SealError> {
        let bad = |message: String| SealError::KeyFile { path: path.to_path_buf(), message };
        let metadata = match std::fs::metadata(path) {
            Ok(metadata) => metadata,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(bad(format!("cannot read it: {e}"))),
        };
        if !metadata.is_file() {
            return Err(bad("is not a regular file: point the setting at the seal key file".into()));
        }
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(bad(format!(
                "has mode {mode:04o}, readable by others than its owner: whoever reads it and the store can \
                 read the CA key; `chmod 600 {}` (and check who copied it)",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
        let hex_part = text.strip_suffix('\n').unwrap_or(&text);
        if hex_part.len() != 2 * KEY_LEN {
            return Err(bad(format!(
                "holds {} characters, and a seal key is {} hex characters ({KEY_LEN} bytes) and an optional \
                 newline: copy the file whole from a coordinator that has it, or make a new one with \
                 `openssl rand -hex 32`",
                hex_part.chars().count(),
                2 * KEY_LEN
            )));
        }
        let mut bytes = [0u8; KEY_LEN];
        hex::decode_to_slice(hex_part, &mut bytes).map_err(|_| {
            bad(format!("is not {} hex characters: copy the file whole from a coordinator that has it", 2 * KEY_LEN))
        })?;
        Ok(Some(SealKey { bytes, path: path.to_path_buf() }))
    }

    /// Makes a new random seal key and writes it to `path` (0600), atomically.
    pub fn create(path: &Path) -> Result<SealKey, SealError> {
        let mut bytes = [0u8; KEY_LEN];
        SystemRandom::new().fill(&mut bytes).map_err(|_| SealError::Crypto("no random bytes".into()))?;
        fsutil::write_atomic(path, format!("{}\n", hex::encode(bytes)).as_bytes(), SECRET_MODE)
            .map_err(|e| SealError::KeyFile { path: path.to_path_buf(), message: format!("cannot write it: {e}") })?;
        Ok(SealKey { bytes, path: path.to_path_buf() })
    }

    /// The key's public name: the first 8 bytes of its sha256, in hex.
    pub fn id(&self) -> String {
        hex::encode(&Sha256::digest(self.bytes)[..8])
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn aead(&self) -> Result<LessSafeKey, SealError> {
        let key = UnboundKey::new(&AES_256_GCM, &self.bytes).map_err(|_| SealError::Crypto("bad key length".into()))?;
        Ok(LessSafeKey::new(key))
    }

    /// `nonce ‖ ciphertext ‖ tag`, with a fresh random nonce.
    fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).map_err(|_| SealError::Crypto("no random bytes".into()))?;
        let mut in_out = plaintext.to_vec();
        self.aead()?
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut in_out)
            .map_err(|_| SealError::Crypto("AES-256-GCM refused the key".into()))?;
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&in_out);
        Ok(sealed)
    }

    /// What [`seal`](Self::seal) sealed, or `None` if it was sealed with another key, under other
    /// additional data, or changed since.
    fn open(&self, sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut in_out = ciphertext.to_vec();
        let plaintext = self.aead().ok()?.open_in_place(nonce, Aad::from(aad), &mut in_out).ok()?;
        Some(plaintext.to_vec())
    }
}

/// The seal keys a coordinator has: the current one (absent until the first coordinator makes it,
/// or until an operator copies it in) and, while rotating, the previous one.
#[derive(Debug, Clone)]
pub struct SealKeys {
    current_path: PathBuf,
    current: Option<SealKey>,
    previous: Option<SealKey>,
}

impl SealKeys {
    /// The keys `[store]` names: `ca_seal_key_file` (empty: `<state_dir>/ca-seal.key`) and
    /// `ca_seal_previous_key_file` (empty: none).
    pub fn load(settings: &StoreSettings, state_dir: &Path) -> Result<SealKeys, SealError> {
        let previous =
            (!settings.ca_seal_previous_key_file.is_empty()).then(|| Path::new(&settings.ca_seal_previous_key_file));
        SealKeys::from_files(&settings.current_seal_key_path(state_dir), previous)
    }

    /// The seal key at `current` (which need not exist yet) and, if given, the previous one at
    /// `previous` (which must).
    pub fn from_files(current: &Path, previous: Option<&Path>) -> Result<SealKeys, SealError> {
        let current_key = SealKey::read(current)?;
        let previous = match previous {
            None => None,
            Some(path) => {
                if path == current {
                    return Err(SealError::KeyFile {
                        path: path.to_path_buf(),
                        message: "is both ca_seal_key_file and ca_seal_previous_key_file: while rotating, the new \
                                  key is ca_seal_key_file and the old one ca_seal_previous_key_file; otherwise \
                                  leave ca_seal_previous_key_file empty"
                            .into(),
                    });
                }
                let key = SealKey::read(path)?.ok_or_else(|| SealError::KeyFile {
                    path: path.to_path_buf(),
                    message: "does not exist (it is ca_seal_previous_key_file): point it at the seal key the CA \
                              was sealed with, or leave it empty"
                        .into(),
                })?;
                if current_key.as_ref().is_some_and(|current| current.bytes == key.bytes) {
                    return Err(SealError::KeyFile {
                        path: path.to_path_buf(),
                        message: format!(
                            "holds the same key (id {}) as ca_seal_key_file {}: put the new key in ca_seal_key_file",
                            key.id(),
                            current.display()
                        ),
                    });
                }
                Some(key)
            }
        };
        Ok(SealKeys { current_path: current.to_path_buf(), current: current_key, previous })
    }

    /// Where the current seal key is, or is to be made.
    pub fn current_path(&self) -> &Path {
        &self.current_path
    }

    pub fn current(&self) -> Option<&SealKey> {
        self.current.as_ref()
    }

    pub fn previous(&self) -> Option<&SealKey> {
        self.previous.as_ref()
    }
}

/// The shared CA as the store holds it (JSON under [`CA_META_KEY`]).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SealedCa {
    pub version: u32,
    /// The CA certificate, PEM, in the clear.
    pub cert_pem: String,
    /// base64 of `nonce (12 bytes) ‖ AES-256-GCM ciphertext of the key's PKCS#8 PEM ‖ tag`.
    pub sealed_key: String,
    /// [`SealKey::id`] of the key it is sealed with.
    pub seal_key_id: String,
}

fn cert_der(cert_pem: &str) -> Result<CertificateDer<'static>, String> {
    CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| format!("the certificate is not PEM: {e}"))
}

/// The additional authenticated data: the sealed key belongs to this certificate.
fn aad(cert_der: &[u8]) -> Vec<u8> {
    let mut aad = AAD_LABEL.to_vec();
    aad.extend_from_slice(&Sha256::digest(cert_der));
    aad
}

impl SealedCa {
    /// Seals `ca`'s key with `key`.
    pub fn seal(ca: &CertificateAuthority, key: &SealKey) -> Result<SealedCa, SealError> {
        let sealed = key.seal(ca.key_pem().as_bytes(), &aad(ca.cert_der()))?;
        Ok(SealedCa {
            version: RECORD_VERSION,
            cert_pem: ca.cert_pem(),
            sealed_key: base64::engine::general_purpose::STANDARD.encode(sealed),
            seal_key_id: key.id(),
        })
    }

    /// The hash of the certificate (in the clear), as agents pin it.
    pub fn ca_hash(&self, location: &str) -> Result<CaHash, SealError> {
        let bad = |message| SealError::BadRecord { location: location.to_string(), message };
        Ok(CaHash::of(&cert_der(&self.cert_pem).map_err(bad)?))
    }

    /// Opens the record with whichever of `keys` it was sealed with; returns the CA and the key
    /// that opened it. `location` names the store in errors.
    pub fn open<'k>(
        &self,
        keys: &'k SealKeys,
        location: &str,
    ) -> Result<(CertificateAuthority, &'k SealKey), SealError> {
        let bad = |message| SealError::BadRecord { location: location.to_string(), message };
        if self.version != RECORD_VERSION {
            return Err(bad(format!(
                "it has version {}, and this coordinator reads version {RECORD_VERSION}: run a newer coordinator",
                self.version
            )));
        }
        let key = [keys.current(), keys.previous()].into_iter().flatten().find(|key| key.id() == self.seal_key_id);
        let Some(key) = key else {
            return Err(match keys.current() {
                None => SealError::NoKeyFile {
                    location: location.to_string(),
                    stored_id: self.seal_key_id.clone(),
                    path: keys.current_path().to_path_buf(),
                },
                Some(current) => SealError::WrongKey {
                    location: location.to_string(),
                    stored_id: self.seal_key_id.clone(),
                    current_id: current.id(),
                    current_path: current.path().to_path_buf(),
                    previous_id: keys.previous().map(SealKey::id),
                },
            });
        };
        let altered = || SealError::Altered { location: location.to_string(), key_id: key.id() };
        let der = cert_der(&self.cert_pem).map_err(bad)?;
        let sealed = base64::engine::general_purpose::STANDARD.decode(&self.sealed_key).map_err(|_| altered())?;
        let key_pem = key.open(&sealed, &aad(&der)).ok_or_else(altered)?;
        let key_pem = String::from_utf8(key_pem).map_err(|_| altered())?;
        let ca = CertificateAuthority::from_pem(&self.cert_pem, &key_pem).map_err(bad)?;
        Ok((ca, key))
    }
}

impl CertificateAuthority {
    /// The CA shared by the coordinators on `store`, for an etcd store (redb keeps using
    /// [`load_or_create`](Self::load_or_create)). Call it once the store is open; `may_write` says
    /// whether this coordinator may write the store now (it leads). Returns the CA and whether this
    /// call created it.
    ///
    /// - The store holds a CA: it is opened with the current seal key, or else with the previous
    ///   one, and then (if `may_write`) sealed again with the current one. A local `ca.crt` that is
    ///   another CA is refused; missing local files are written, so that the state directory holds
    ///   the CA this coordinator issues from.
    /// - The store holds none: the local CA (a single coordinator moving to etcd) or else a new one
    ///   is sealed and stored, unless another coordinator stored one first, which is then used. The
    ///   first coordinator makes the seal key file if there is none yet.
    pub fn load_or_create_shared(
        state_dir: &Path,
        store: &Store,
        seal: &SealKeys,
        may_write: bool,
    ) -> Result<(CertificateAuthority, bool), BootstrapError> {
        let location = store.location();
        let local = CertificateAuthority::load_local(state_dir)?;
        if let Some(record) = store.meta::<SealedCa>(CA_META_KEY)? {
            let ca = adopt(&record, local.as_ref(), state_dir, store, seal, may_write)?;
            return Ok((ca, false));
        }
        if !may_write {
            return Err(SealError::NotStoredYet { location }.into());
        }
        let (key, made_key) = match seal.current() {
            Some(key) => (key.clone(), false),
            None => {
                let key = SealKey::create(seal.current_path())?;
                tracing::info!(path = %key.path().display(), seal_key_id = %key.id(), "CA seal key created");
                (key, true)
            }
        };
        let (ca, created) = match local {
            Some(ca) => (ca, false),
            None => (CertificateAuthority::generate()?, true),
        };
        let record = SealedCa::seal(&ca, &key)?;
        let stored = store.write::<_, StoreError>(|tx| {
            if let Some(theirs) = tx.meta::<SealedCa>(CA_META_KEY)? {
                return Ok(Some(theirs));
            }
            tx.set_meta(CA_META_KEY, &record)?;
            Ok(None)
        });
        let theirs = match stored {
            Ok(None) => {
                if created {
                    ca.write_local(state_dir)?;
                }
                tracing::info!(
                    ca_hash = %ca.hash(), seal_key_id = %key.id(), store = %location, created,
                    "certificate authority sealed into the store"
                );
                return Ok((ca, created));
            }
            Ok(Some(theirs)) => theirs,
            // Another coordinator stored its CA between our read and our commit.
            Err(StoreError::Conflict { .. }) => store
                .meta::<SealedCa>(CA_META_KEY)?
                .ok_or_else(|| SealError::BadRecord { location: location.clone(), message: "it vanished".into() })?,
            Err(e) => return Err(e.into()),
        };
        let mut seal = seal.clone();
        if made_key {
            // Ours sealed nothing: gone, so that the next start asks for the winner's key instead
            // of naming a key nobody else has.
            let _ = std::fs::remove_file(seal.current_path());
            seal.current = None;
        } else {
            seal.current = Some(key);
        }
        let local = if created { None } else { Some(ca) };
        let ca = adopt(&theirs, local.as_ref(), state_dir, store, &seal, may_write)?;
        Ok((ca, false))
    }
}

/// Uses the CA the store holds: opens it, checks it against the local one, seals it again with the
/// current key if the previous one opened it, and writes the local files if they are missing.
fn adopt(
    record: &SealedCa,
    local: Option<&CertificateAuthority>,
    state_dir: &Path,
    store: &Store,
    seal: &SealKeys,
    may_write: bool,
) -> Result<CertificateAuthority, BootstrapError> {
    let location = store.location();
    // The certificate is in the clear: a different CA is refused whatever the keys.
    let stored = record.ca_hash(&location)?;
    if let Some(local) = local
        && local.hash() != stored
    {
        return Err(
            SealError::OtherCa { location, stored, state_dir: state_dir.to_path_buf(), local: local.hash() }.into()
        );
    }
    let (ca, opened_with) = record.open(seal, &location)?;
    if let Some(current) = seal.current()
        && current.id() != opened_with.id()
        && may_write
    {
        let resealed = SealedCa::seal(&ca, current)?;
        let rotated = store.write::<_, StoreError>(|tx| {
            // Only over the record just read: if another coordinator changed it, theirs stands.
            if tx.meta::<SealedCa>(CA_META_KEY)?.as_ref() != Some(record) {
                return Ok(false);
            }
            tx.set_meta(CA_META_KEY, &resealed)?;
            Ok(true)
        });
        match rotated {
            Ok(true) => tracing::info!(
                seal_key_id = %current.id(), previous_seal_key_id = %opened_with.id(), store = %location,
                "CA key sealed again with the current seal key; the previous one may be removed"
            ),
            Ok(false) | Err(StoreError::Conflict { .. }) => tracing::warn!(
                store = %location,
                "the CA record changed while sealing it again with the current seal key; left as it is"
            ),
            Err(e) => return Err(e.into()),
        }
    }
    if local.is_none() {
        ca.write_local(state_dir)?;
        tracing::info!(ca_hash = %ca.hash(), state_dir = %state_dir.display(), "shared CA written to the state directory");
    }
    Ok(ca)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_file(dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        SealKey::create(&path).unwrap();
        path
    }

    fn keys(current: &Path, previous: Option<&Path>) -> SealKeys {
        SealKeys::from_files(current, previous).unwrap()
    }

    fn store(dir: &Path) -> Store {
        Store::open(&dir.join("state.redb")).unwrap()
    }

    fn tamper(record: &SealedCa, at: usize) -> SealedCa {
        let mut bytes = base64::engine::general_purpose::STANDARD.decode(&record.sealed_key).unwrap();
        bytes[at] ^= 0x01;
        SealedCa { sealed_key: base64::engine::general_purpose::STANDARD.encode(bytes), ..record.clone() }
    }

    #[test]
    fn a_sealed_ca_opens_with_its_key_and_is_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate().unwrap();
        let seal = keys(&key_file(dir.path(), "seal.key"), None);
        let record = SealedCa::seal(&ca, seal.current().unwrap()).unwrap();
        assert_eq!(record.seal_key_id, seal.current().unwrap().id());
        assert_eq!(record.seal_key_id.len(), 16);
        assert!(!record.sealed_key.contains("PRIVATE") && !record.cert_pem.contains("PRIVATE"));
        let (opened, with) = record.open(&seal, "here").unwrap();
        assert_eq!(opened.hash(), ca.hash());
        assert_eq!(opened.key_pem(), ca.key_pem());
        assert_eq!(with.id(), record.seal_key_id);
        // A fresh nonce each time: the same key sealed twice is two different records.
        assert_ne!(SealedCa::seal(&ca, seal.current().unwrap()).unwrap().sealed_key, record.sealed_key);
    }

    #[test]
    fn another_key_does_not_open_it_and_the_error_names_both_ids() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate().unwrap();
        let ours = keys(&key_file(dir.path(), "ours.key"), None);
        let theirs = keys(&key_file(dir.path(), "theirs.key"), None);
        let record = SealedCa::seal(&ca, ours.current().unwrap()).unwrap();
        let err = record.open(&theirs, "etcd x").unwrap_err().to_string();
        assert!(err.contains(&ours.current().unwrap().id()), "{err}");
        assert!(err.contains(&theirs.current().unwrap().id()), "{err}");
        assert!(err.contains("copy the seal key file"), "{err}");
        // A record claiming the other key's id does not open either: the key itself is checked.
        let relabelled = SealedCa { seal_key_id: theirs.current().unwrap().id(), ..record.clone() };
        let err = relabelled.open(&theirs, "etcd x").unwrap_err();
        assert!(matches!(err, SealError::Altered { .. }), "{err}");
        // Without a key file at all, the error says where to put it.
        let none = SealKeys::from_files(&dir.path().join("absent.key"), None).unwrap();
        let err = record.open(&none, "etcd x").unwrap_err().to_string();
        assert!(err.contains("absent.key") && err.contains(&record.seal_key_id), "{err}");
    }

    #[test]
    fn a_changed_sealed_key_or_a_swapped_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate().unwrap();
        let seal = keys(&key_file(dir.path(), "seal.key"), None);
        let record = SealedCa::seal(&ca, seal.current().unwrap()).unwrap();
        let sealed_len = base64::engine::general_purpose::STANDARD.decode(&record.sealed_key).unwrap().len();
        // The nonce, the ciphertext and the tag are each covered.
        for at in [0, NONCE_LEN + 3, sealed_len - 1] {
            let err = tamper(&record, at).open(&seal, "etcd x").unwrap_err();
            assert!(matches!(err, SealError::Altered { .. }), "byte {at}: {err}");
        }
        let truncated = SealedCa { sealed_key: "AAAA".into(), ..record.clone() };
        assert!(matches!(truncated.open(&seal, "etcd x").unwrap_err(), SealError::Altered { .. }));
        // Another CA's certificate beside this key: the additional data no longer matches.
        let other = CertificateAuthority::generate().unwrap();
        let swapped = SealedCa { cert_pem: other.cert_pem(), ..record.clone() };
        let err = swapped.open(&seal, "etcd x").unwrap_err();
        assert!(matches!(err, SealError::Altered { .. }), "{err}");
        assert!(err.to_string().contains("altered"), "{err}");
        let newer = SealedCa { version: 2, ..record };
        assert!(newer.open(&seal, "etcd x").unwrap_err().to_string().contains("run a newer coordinator"));
    }

    #[test]
    fn key_files_others_can_read_or_of_the_wrong_shape_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let hex64 = "0123456789abcdef".repeat(4);
        let cases: [(&str, String, u32, Option<&str>); 9] = [
            ("ok", hex64.clone(), 0o600, None),
            ("ok-newline", format!("{hex64}\n"), 0o400, None),
            ("ok-upper", hex64.to_uppercase(), 0o600, None),
            ("group", hex64.clone(), 0o640, Some("mode 0640")),
            ("other", format!("{hex64}\n"), 0o604, Some("chmod 600")),
            ("short", hex64[..62].to_string(), 0o600, Some("holds 62 characters")),
            ("long", format!("{hex64}00"), 0o600, Some("holds 66 characters")),
            ("two-newlines", format!("{hex64}\n\n"), 0o600, Some("holds 65 characters")),
            ("not-hex", "g".repeat(64), 0o600, Some("is not 64 hex characters")),
        ];
        for (name, text, mode, refused) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, &text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            match (SealKey::read(&path), refused) {
                (Ok(Some(key)), None) => assert_eq!(key.id().len(), 16, "{name}"),
                (Err(err), Some(expected)) => {
                    let err = err.to_string();
                    assert!(err.contains(expected) && err.contains(name), "{name}: {err}");
                }
                (other, _) => panic!("{name}: {other:?}"),
            }
        }
        assert!(SealKey::read(&dir.path().join("absent")).unwrap().is_none());
        let made = key_file(dir.path(), "made.key");
        assert_eq!(std::fs::metadata(&made).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&made).unwrap().len(), 65);
        // The previous key must exist, and must not be the current one.
        let err = SealKeys::from_files(&made, Some(&dir.path().join("absent"))).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
        let err = SealKeys::from_files(&made, Some(&made)).unwrap_err().to_string();
        assert!(err.contains("is both ca_seal_key_file and ca_seal_previous_key_file"), "{err}");
        let copy = dir.path().join("copy.key");
        std::fs::copy(&made, &copy).unwrap();
        let err = SealKeys::from_files(&made, Some(&copy)).unwrap_err().to_string();
        assert!(err.contains("holds the same key"), "{err}");
    }

    #[test]
    fn the_first_coordinator_makes_the_key_and_the_ca_and_the_second_takes_both() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let (one, two) = (dir.path().join("one"), dir.path().join("two"));
        fsutil::ensure_private_dir(&one).unwrap();
        fsutil::ensure_private_dir(&two).unwrap();
        let one_key = one.join(SEAL_KEY_FILE);
        let (first, created) =
            CertificateAuthority::load_or_create_shared(&one, &store, &keys(&one_key, None), true).unwrap();
        assert!(created);
        assert_eq!(std::fs::metadata(&one_key).unwrap().permissions().mode() & 0o777, 0o600);
        let (local, _) = CertificateAuthority::load_or_create(&one).unwrap();
        assert_eq!(local.hash(), first.hash());
        let record: SealedCa = store.meta(CA_META_KEY).unwrap().unwrap();
        assert_eq!(record.ca_hash("x").unwrap(), first.hash());

        // The second without the seal key: refused, saying where to copy it.
        let two_key = two.join(SEAL_KEY_FILE);
        let err = CertificateAuthority::load_or_create_shared(&two, &store, &keys(&two_key, None), true)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&two_key.display().to_string()) && err.contains("copy the seal key file"), "{err}");
        assert!(!two_key.exists() && !two.join("ca.key").exists());

        std::fs::copy(&one_key, &two_key).unwrap();
        let (second, created) =
            CertificateAuthority::load_or_create_shared(&two, &store, &keys(&two_key, None), false).unwrap();
        assert!(!created);
        assert_eq!(second.hash(), first.hash());
        let mode = std::fs::metadata(two.join("ca.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(CertificateAuthority::load_or_create(&two).unwrap().0.hash(), first.hash());
        // Started again, it reads the same CA, locally and in the store.
        let (again, created) =
            CertificateAuthority::load_or_create_shared(&two, &store, &keys(&two_key, None), true).unwrap();
        assert!(!created);
        assert_eq!(again.hash(), first.hash());
        assert_eq!(store.meta::<SealedCa>(CA_META_KEY).unwrap().unwrap(), record);
    }

    #[test]
    fn a_single_coordinators_ca_moves_into_the_store_and_another_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let (old, other) = (dir.path().join("old"), dir.path().join("other"));
        fsutil::ensure_private_dir(&old).unwrap();
        let (existing, _) = CertificateAuthority::load_or_create(&old).unwrap();
        let seal = keys(&old.join(SEAL_KEY_FILE), None);
        // Not leading yet: nothing is written.
        let err = CertificateAuthority::load_or_create_shared(&old, &store, &seal, false).unwrap_err();
        assert!(matches!(err, BootstrapError::Seal(SealError::NotStoredYet { .. })), "{err}");
        assert!(store.meta::<SealedCa>(CA_META_KEY).unwrap().is_none());
        let (moved, created) = CertificateAuthority::load_or_create_shared(&old, &store, &seal, true).unwrap();
        assert!(!created);
        assert_eq!(moved.hash(), existing.hash());
        let seal = keys(&old.join(SEAL_KEY_FILE), None);
        assert_eq!(store.meta::<SealedCa>(CA_META_KEY).unwrap().unwrap().seal_key_id, seal.current().unwrap().id());

        // A coordinator with a CA of its own: refused, naming both.
        fsutil::ensure_private_dir(&other).unwrap();
        let (own, _) = CertificateAuthority::load_or_create(&other).unwrap();
        std::fs::copy(old.join(SEAL_KEY_FILE), other.join(SEAL_KEY_FILE)).unwrap();
        let err =
            CertificateAuthority::load_or_create_shared(&other, &store, &keys(&other.join(SEAL_KEY_FILE), None), true)
                .unwrap_err()
                .to_string();
        assert!(err.contains(&own.hash().to_string()) && err.contains(&existing.hash().to_string()), "{err}");
        assert!(err.contains("do not trust the other"), "{err}");
    }

    #[test]
    fn rotation_seals_the_ca_again_with_the_new_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let state = dir.path().join("state");
        fsutil::ensure_private_dir(&state).unwrap();
        let old = state.join(SEAL_KEY_FILE);
        let (ca, _) = CertificateAuthority::load_or_create_shared(&state, &store, &keys(&old, None), true).unwrap();
        let new = key_file(dir.path(), "new.key");
        let rotating = keys(&new, Some(&old));
        // A coordinator that does not lead opens it with the previous key and writes nothing.
        let (opened, _) = CertificateAuthority::load_or_create_shared(&state, &store, &rotating, false).unwrap();
        assert_eq!(opened.hash(), ca.hash());
        let record: SealedCa = store.meta(CA_META_KEY).unwrap().unwrap();
        assert_eq!(record.seal_key_id, keys(&old, None).current().unwrap().id());
        // The leader seals it again.
        let (opened, _) = CertificateAuthority::load_or_create_shared(&state, &store, &rotating, true).unwrap();
        assert_eq!(opened.hash(), ca.hash());
        let record: SealedCa = store.meta(CA_META_KEY).unwrap().unwrap();
        assert_eq!(record.seal_key_id, rotating.current().unwrap().id());
        let (opened, _) = CertificateAuthority::load_or_create_shared(&state, &store, &keys(&new, None), true).unwrap();
        assert_eq!(opened.hash(), ca.hash());
        // The old key alone opens it no more.
        let err = CertificateAuthority::load_or_create_shared(&state, &store, &keys(&old, None), true).unwrap_err();
        assert!(matches!(err, BootstrapError::Seal(SealError::WrongKey { .. })), "{err}");
    }
}

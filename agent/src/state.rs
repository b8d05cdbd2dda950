//! The agent's state directory: its key (0600, generated here and never sent anywhere), its
//! certificate, the coordinator CA it pinned, and the last spec it applied.
//!
//! Key and certificate change together on renewal. The new key is written beside the old one
//! first, then the certificate, then the key is moved into place; a crash at any point leaves
//! either the old pair or the new pair, which [`StateDir::load_identity`] sorts out.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use hexa_shared::fsutil::{self, FsError, PUBLIC_MODE, SECRET_MODE};
use hexa_shared::spec::NodeSpec;

const KEY: &str = "node.key";
const NEXT_KEY: &str = "node.key.next";
const CERT: &str = "node.crt";
const CA: &str = "ca.crt";
const SPEC: &str = "spec.json";
/// A copy of the last spec written whole, kept beside `spec.json`: a `spec.json` that cannot be
/// read (a bad edit, a broken disk block) must not leave the node without isolation.
const LAST_GOOD_SPEC: &str = "spec.last-good.json";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{path}: {message}")]
    Corrupt { path: PathBuf, message: String },
}

/// What the node is, once enrolled.
#[derive(Debug)]
pub struct Identity {
    pub key_pem: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub ca: CertificateDer<'static>,
    pub node_name: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
}

impl Identity {
    pub fn key_der(&self) -> Result<PrivateKeyDer<'static>, StateError> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| StateError::Corrupt { path: PathBuf::from(KEY), message: e.to_string() })
    }
}

#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

fn pem_chain(chain: &[Vec<u8>]) -> String {
    chain.iter().map(|der| pem_block("CERTIFICATE", der)).collect()
}

pub fn pem_block(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}

/// The public key (SubjectPublicKeyInfo DER) a certificate was issued for.
fn cert_spki(der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    X509Certificate::from_der(der).ok().map(|(_, c)| c.public_key().raw.to_vec())
}

fn key_spki(key_pem: &str) -> Option<Vec<u8>> {
    use rcgen::PublicKeyData;
    rcgen::KeyPair::from_pem(key_pem).ok().map(|k| k.subject_public_key_info())
}

impl StateDir {
    pub fn open(dir: &Path) -> Result<StateDir, StateError> {
        fsutil::ensure_private_dir(dir)?;
        Ok(StateDir { dir: dir.to_path_buf() })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn is_enrolled(&self) -> bool {
        self.path(CERT).exists() && self.path(KEY).exists() && self.path(CA).exists()
    }

    /// Saves what enrollment produced: key, certificate chain and the pinned CA.
    pub fn save_enrollment(&self, key_pem: &str, chain: &[Vec<u8>], ca_der: &[u8]) -> Result<(), StateError> {
        fsutil::write_atomic(&self.path(CA), pem_block("CERTIFICATE", ca_der).as_bytes(), PUBLIC_MODE)?;
        fsutil::write_atomic(&self.path(KEY), key_pem.as_bytes(), SECRET_MODE)?;
        fsutil::write_atomic(&self.path(CERT), pem_chain(chain).as_bytes(), PUBLIC_MODE)?;
        Ok(())
    }

    /// Replaces key and certificate after a renewal (see the module docs for the crash story).
    pub fn save_renewal(&self, key_pem: &str, chain: &[Vec<u8>]) -> Result<(), StateError> {
        fsutil::write_atomic(&self.path(NEXT_KEY), key_pem.as_bytes(), SECRET_MODE)?;
        fsutil::write_atomic(&self.path(CERT), pem_chain(chain).as_bytes(), PUBLIC_MODE)?;
        std::fs::rename(self.path(NEXT_KEY), self.path(KEY)).map_err(|source| FsError {
            action: "rename into place",
            path: self.path(KEY),
            source,
        })?;
        Ok(())
    }

    pub fn load_identity(&self) -> Result<Identity, StateError> {
        let corrupt = |name: &str, message: String| StateError::Corrupt { path: self.path(name), message };
        let cert_pem = fsutil::read_to_string(&self.path(CERT))?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| corrupt(CERT, e.to_string()))?;
        let leaf = chain.first().ok_or_else(|| corrupt(CERT, "no certificate in the file".into()))?;
        let leaf_spki = cert_spki(leaf);
        let mut key_pem = fsutil::read_to_string(&self.path(KEY))?;
        if self.path(NEXT_KEY).exists() {
            let next = fsutil::read_to_string(&self.path(NEXT_KEY))?;
            if key_spki(&next).is_some() && key_spki(&next) == leaf_spki {
                // Crashed after writing the renewed certificate: finish the renewal.
                std::fs::rename(self.path(NEXT_KEY), self.path(KEY)).map_err(|source| FsError {
                    action: "rename into place",
                    path: self.path(KEY),
                    source,
                })?;
                key_pem = next;
            } else {
                let _ = std::fs::remove_file(self.path(NEXT_KEY));
            }
        }
        if key_spki(&key_pem).is_none() || key_spki(&key_pem) != leaf_spki {
            return Err(corrupt(KEY, "the key does not belong to node.crt; enroll the node again".into()));
        }
        let ca_pem = fsutil::read_to_string(&self.path(CA))?;
        let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| corrupt(CA, e.to_string()))?;
        let id = hexa_shared::pki::cert_identity(leaf).map_err(|e| corrupt(CERT, e.to_string()))?;
        Ok(Identity {
            key_pem,
            chain,
            ca,
            node_name: id.common_name,
            not_before_unix: id.not_before_unix,
            not_after_unix: id.not_after_unix,
        })
    }

    /// The last spec this node applied, which it keeps enforcing while the coordinator is away.
    /// When `spec.json` cannot be read, the last good copy beside it stands in (logged); when
    /// neither can, there is nothing to enforce until the coordinator sends a spec, and the agent
    /// keeps connecting rather than stopping on the same error after every restart.
    pub fn load_spec(&self) -> Result<Option<NodeSpec>, StateError> {
        match self.read_spec(SPEC) {
            Err(corrupt @ StateError::Corrupt { .. }) => match self.read_spec(LAST_GOOD_SPEC) {
                Ok(Some(spec)) => {
                    tracing::warn!(error = %corrupt, generation = spec.generation, "using the last good spec kept beside it");
                    Ok(Some(spec))
                }
                Ok(None) | Err(_) => {
                    tracing::error!(
                        error = %corrupt,
                        "no readable spec on this node: nothing to enforce until the coordinator sends one"
                    );
                    Ok(None)
                }
            },
            other => other,
        }
    }

    /// True when the node holds a spec that cannot be read, and no good copy either: it applied
    /// isolation once, so it must not run its pods open (the agent enforces a baseline).
    pub fn spec_is_lost(&self) -> bool {
        matches!(self.read_spec(SPEC), Err(StateError::Corrupt { .. }))
            && !matches!(self.read_spec(LAST_GOOD_SPEC), Ok(Some(_)))
    }

    fn read_spec(&self, name: &str) -> Result<Option<NodeSpec>, StateError> {
        let path = self.path(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                serde_json::from_str(&text).map(Some).map_err(|e| StateError::Corrupt { path, message: e.to_string() })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(FsError { action: "read", path, source }.into()),
        }
    }

    /// Saves the applied spec, private to root: it carries the node's K3s join token. The copy
    /// beside it is written second, so that at every moment at least one of the two is whole.
    pub fn save_spec(&self, spec: &NodeSpec) -> Result<(), StateError> {
        let text = serde_json::to_vec_pretty(spec).unwrap_or_default();
        fsutil::write_atomic(&self.path(SPEC), &text, SECRET_MODE)?;
        fsutil::write_atomic(&self.path(LAST_GOOD_SPEC), &text, SECRET_MODE)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_applied_spec_is_private_even_over_an_old_public_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        std::fs::write(state.path(SPEC), "{}").unwrap();
        std::fs::set_permissions(state.path(SPEC), std::fs::Permissions::from_mode(0o644)).unwrap();
        let spec = NodeSpec::for_pool("n1", &hexa_shared::names::Pool::Shared, 3);
        state.save_spec(&spec).unwrap();
        let mode = std::fs::metadata(state.path(SPEC)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(state.load_spec().unwrap().map(|s| s.generation), Some(3));
    }

    #[test]
    fn an_unreadable_spec_falls_back_to_the_last_good_copy() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert_eq!(state.load_spec().unwrap(), None);
        assert!(!state.spec_is_lost(), "a node that never had a spec has lost none");
        let spec = NodeSpec::for_pool("n1", &hexa_shared::names::Pool::Shared, 7);
        state.save_spec(&spec).unwrap();
        std::fs::write(state.path(SPEC), "{ not json").unwrap();
        assert_eq!(state.load_spec().unwrap(), Some(spec.clone()), "the copy stands in");
        // The next save heals spec.json.
        state.save_spec(&spec).unwrap();
        assert_eq!(state.read_spec(SPEC).unwrap(), Some(spec));
        // Both unreadable: nothing to enforce, and no error that would stop the agent.
        std::fs::write(state.path(SPEC), "garbage").unwrap();
        std::fs::write(state.path(LAST_GOOD_SPEC), "garbage").unwrap();
        assert_eq!(state.load_spec().unwrap(), None);
        assert!(state.spec_is_lost(), "the baseline is due");
    }

    #[test]
    fn pem_blocks_round_trip() {
        for len in [0usize, 1, 2, 3, 4, 100, 1000] {
            let der: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let pem = pem_block("CERTIFICATE", &der);
            let back = CertificateDer::from_pem_slice(pem.as_bytes());
            if len == 0 {
                continue;
            }
            assert_eq!(back.unwrap().as_ref(), der.as_slice(), "len {len}");
        }
    }
}

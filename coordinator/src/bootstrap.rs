//! Trust bootstrap: the coordinator's CA, its server certificate, bootstrap tokens and the admin
//! token.
//!
//! Bootstrap tokens look like kubeadm's: `<id>.<secret>`, six and sixteen characters of `[a-z0-9]`.
//! The id is public (it names the token in listings); only the sha256 of the secret is stored, the
//! token is shown once when minted, and it is consumed atomically with the enrollment it admits.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::Rng;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use hexa_shared::fsutil::{self, PUBLIC_MODE, SECRET_MODE};
use hexa_shared::pki::{COORDINATOR_SERVER_NAME, CaHash};

const CA_CERT_FILE: &str = "ca.crt";
const CA_KEY_FILE: &str = "ca.key";
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// Certificates are back-dated this much so that a node whose clock is slightly behind accepts them.
const CLOCK_SKEW: time::Duration = time::Duration::minutes(5);
const CA_VALIDITY: time::Duration = time::Duration::days(3650);

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(transparent)]
    Fs(#[from] fsutil::FsError),
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("the CSR is invalid: {0}")]
    BadCsr(String),
    /// The CA shared through the store (see [`crate::ca_seal`]).
    #[error(transparent)]
    Seal(#[from] crate::ca_seal::SealError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// The coordinator's certificate authority. Its key lives in `<state-dir>/ca.key` (0600) and, when
/// coordinators share an etcd store, sealed in the store as well (see [`crate::ca_seal`]).
pub struct CertificateAuthority {
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority").field("hash", &self.hash()).finish_non_exhaustive()
    }
}

/// A certificate the CA issued.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_der: CertificateDer<'static>,
    pub serial: String,
    pub not_after_unix: i64,
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill(&mut bytes);
    // A positive DER integer: clear the top bit so the serial is never read as negative.
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

impl CertificateAuthority {
    /// Loads the CA from `state_dir`, creating it on first start. Returns whether it was created.
    pub fn load_or_create(state_dir: &Path) -> Result<(CertificateAuthority, bool), BootstrapError> {
        if let Some(ca) = Self::load_local(state_dir)? {
            return Ok((ca, false));
        }
        let ca = Self::generate()?;
        ca.write_local(state_dir)?;
        Ok((ca, true))
    }

    /// The CA in `state_dir`, or `None` when neither of its files is there. One file without the
    /// other is an error, not a reason to make a second CA.
    pub(crate) fn load_local(state_dir: &Path) -> Result<Option<CertificateAuthority>, BootstrapError> {
        let cert_path = state_dir.join(CA_CERT_FILE);
        let key_path = state_dir.join(CA_KEY_FILE);
        if !cert_path.exists() && !key_path.exists() {
            return Ok(None);
        }
        let bad = |path: &Path, message: String| BootstrapError::BadFile { path: path.to_path_buf(), message };
        let key_pem = fsutil::read_to_string(&key_path)?;
        let cert_pem = fsutil::read_to_string(&cert_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(&key_path, e.to_string()))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| bad(&cert_path, format!("not a PEM certificate: {e}")))?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| bad(&cert_path, e.to_string()))?;
        Ok(Some(CertificateAuthority { cert_der, issuer }))
    }

    /// A new CA, valid for ten years, kept nowhere yet.
    pub(crate) fn generate() -> Result<CertificateAuthority, BootstrapError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Hexabase node plane CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let cert_der = cert.der().clone();
        Ok(CertificateAuthority { cert_der, issuer: Issuer::new(params, key) })
    }

    /// Writes `ca.key` (0600) and `ca.crt` into `state_dir`, each atomically.
    pub(crate) fn write_local(&self, state_dir: &Path) -> Result<(), BootstrapError> {
        // Key first: a crash between the two writes leaves a key without a cert, which the next
        // start reports instead of silently creating a second CA that agents would not trust.
        fsutil::write_atomic(&state_dir.join(CA_KEY_FILE), self.key_pem().as_bytes(), SECRET_MODE)?;
        fsutil::write_atomic(&state_dir.join(CA_CERT_FILE), self.cert_pem().as_bytes(), PUBLIC_MODE)?;
        Ok(())
    }

    /// A CA from its certificate and key as PEM, once the key is shown to be the certificate's.
    pub(crate) fn from_pem(cert_pem: &str, key_pem: &str) -> Result<CertificateAuthority, String> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| format!("the CA key is not a PEM private key: {e}"))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| format!("the CA certificate is not a PEM certificate: {e}"))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| format!("the CA certificate cannot be parsed: {e}"))?;
        if parsed.public_key().subject_public_key.data.as_ref() != rcgen::PublicKeyData::der_bytes(&key) {
            return Err("the CA key is not the key of the CA certificate".into());
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| e.to_string())?;
        Ok(CertificateAuthority { cert_der, issuer })
    }

    /// The certificate as PEM.
    pub(crate) fn cert_pem(&self) -> String {
        let pem = pem::Pem::new("CERTIFICATE", self.cert_der.to_vec());
        pem::encode_config(&pem, pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF))
    }

    /// The private key as PEM (PKCS#8): the one secret of the CA.
    pub(crate) fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn hash(&self) -> CaHash {
        CaHash::of(&self.cert_der)
    }

    fn leaf_params(common_name: &str, validity: Duration) -> CertificateParams {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        // Back-dating stays a small part of the lifetime, so that renewal at two thirds of it
        // still means two thirds of the validity the operator configured.
        let validity = time::Duration::try_from(validity).unwrap_or(CA_VALIDITY);
        params.not_before = now - CLOCK_SKEW.min(validity / 10);
        params.not_after = now + validity;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        params
    }

    /// Signs a node's CSR for `node_name`. Only the CSR's public key is used: its subject, names
    /// and extensions are what the node asked for, and the coordinator decides those itself.
    pub fn sign_node_csr(&self, csr_der: &[u8], node_name: &str, validity: Duration) -> Result<Issued, BootstrapError> {
        let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
            .map_err(|e| BootstrapError::BadCsr(e.to_string()))?;
        let mut params = Self::leaf_params(node_name, validity);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let not_after_unix = params.not_after.unix_timestamp();
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        let serial =
            hexa_shared::pki::cert_identity(cert.der()).map_err(|e| BootstrapError::BadCsr(e.to_string()))?.serial;
        Ok(Issued { cert_der: cert.der().clone(), serial, not_after_unix })
    }

    /// A fresh server certificate and key for this run of the coordinator.
    pub fn issue_server_cert(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), BootstrapError> {
        let key = KeyPair::generate()?;
        let mut params = Self::leaf_params(COORDINATOR_SERVER_NAME, Duration::from_secs(365 * 24 * 3600));
        params.subject_alt_names = vec![SanType::DnsName(COORDINATOR_SERVER_NAME.try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        let key_der =
            PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| BootstrapError::BadCsr(e.to_string()))?;
        // The CA travels in the chain so that an enrolling agent can check it against its pin.
        Ok((vec![cert.der().clone(), self.cert_der.clone()], key_der))
    }
}

/// A freshly minted bootstrap token: the only moment its secret exists outside the node.
#[derive(Debug, Clone)]
pub struct MintedToken {
    pub id: String,
    pub secret: String,
}

impl MintedToken {
    pub fn generate() -> MintedToken {
        MintedToken { id: random_token_chars(6), secret: random_token_chars(16) }
    }

    pub fn text(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }
}

fn random_token_chars(n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..n).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

/// Splits `<id>.<secret>`, checking the shape so that garbage never reaches the store.
pub fn parse_token(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.split_once('.')?;
    let ok = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    (ok(id, 6) && ok(secret, 16)).then_some((id, secret))
}

pub fn sha256_hex(data: &str) -> String {
    hex::encode(Sha256::digest(data.as_bytes()))
}

/// Compares two hashes without an early exit, so timing reveals nothing about the stored one.
pub fn hashes_equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 256 random bits as hex.
pub fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill(&mut bytes);
    hex::encode(bytes)
}

/// Writes a new admin token to `<state-dir>/admin.token` (0600) and returns its hash for the store.
pub fn create_admin_token(state_dir: &Path) -> Result<String, BootstrapError> {
    let token = random_secret();
    fsutil::write_atomic(&state_dir.join(ADMIN_TOKEN_FILE), format!("{token}\n").as_bytes(), SECRET_MODE)?;
    Ok(sha256_hex(&token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_ca_is_created_once_with_a_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, created) = CertificateAuthority::load_or_create(dir.path()).unwrap();
        assert!(created);
        let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, created) = CertificateAuthority::load_or_create(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(ca.hash(), again.hash());
    }

    #[test]
    fn a_half_written_ca_is_reported_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CA_KEY_FILE), "junk").unwrap();
        let err = CertificateAuthority::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(err.contains("ca.crt"), "{err}");
    }

    #[test]
    fn node_certificates_carry_the_name_the_coordinator_chose() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let key = KeyPair::generate().unwrap();
        // The node asks for names of its own choosing, including the coordinator's.
        let mut asked = CertificateParams::new(vec![COORDINATOR_SERVER_NAME.to_string()]).unwrap();
        asked.distinguished_name.push(DnType::CommonName, "someone-else");
        let csr = asked.serialize_request(&key).unwrap();
        let issued = ca.sign_node_csr(csr.der(), "node-1", Duration::from_secs(3600)).unwrap();
        let identity = hexa_shared::pki::cert_identity(&issued.cert_der).unwrap();
        assert_eq!(identity.common_name, "node-1");
        assert_eq!(identity.serial, issued.serial);
        let (_, parsed) = x509_parser::parse_x509_certificate(&issued.cert_der).unwrap();
        assert!(parsed.subject_alternative_name().unwrap().is_none(), "requested SANs must be dropped");
        let eku = parsed.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(ca.sign_node_csr(b"not a csr", "node-1", Duration::from_secs(60)).is_err());
    }

    #[test]
    fn tokens_have_the_documented_shape() {
        let token = MintedToken::generate().text();
        let (id, secret) = parse_token(&token).unwrap();
        assert_eq!((id.len(), secret.len()), (6, 16));
        for bad in ["", "abcdef", "abcdef.", "ABCDEF.0123456789abcdef", "abcdef.0123456789abcde", "abc.def.ghi"] {
            assert!(parse_token(bad).is_none(), "{bad}");
        }
        assert!(hashes_equal(&sha256_hex("a"), &sha256_hex("a")));
        assert!(!hashes_equal(&sha256_hex("a"), &sha256_hex("b")));
    }
}

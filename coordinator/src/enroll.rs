//! Enrollment and certificate renewal: who may become which node.
//!
//! A bootstrap token admits one node into its pool. The node's name is the one it asks for (or its
//! hostname) when that name is free; a taken name is never handed over on the strength of anything
//! the machine says about itself (its machine-id is the same on every clone of a template). Only a
//! re-enrollment token minted for a node (`hexactl node reenroll NAME`) enrolls as that node again,
//! in its pool, and for a machine known by its provider identity only with that identity. The
//! certificate the coordinator signs carries the name it chose; the CSR's own names are ignored.

use std::sync::Arc;
use std::time::Duration;

use hexa_shared::clock::now_unix;
use hexa_shared::names::{node_name_from_hostname, validate_node_name};
use hexa_shared::proto::{EnrollRequest, Enrolled, ProviderIdentity, Refusal, RefusalCode};
use hexa_shared::spec::NodeSpec;

use crate::bootstrap::{CertificateAuthority, Issued, hashes_equal, parse_token, sha256_hex};
use crate::store::{Health, NodeRecord, Store, TokenRecord, TokenState, Tx};

pub fn refusal(code: RefusalCode, message: impl Into<String>) -> Refusal {
    Refusal { code, message: message.into() }
}

impl From<crate::store::StoreError> for Refusal {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "state database failed during a node request");
        refusal(RefusalCode::Internal, "the coordinator could not record the request; try again")
    }
}

/// What an accepted enrollment produced.
#[derive(Debug)]
pub struct Admitted {
    /// The node's new record, already persisted.
    pub record: NodeRecord,
    pub enrolled: Enrolled,
    /// Set when the node existed before (a re-enrollment): its record as it was.
    pub replaced: Option<NodeRecord>,
}

/// Signs what the CA signs for nodes, and decides names.
#[derive(Debug)]
pub struct Enroller {
    store: Store,
    ca: Arc<CertificateAuthority>,
    node_cert_validity: Duration,
}

impl Enroller {
    pub fn new(store: Store, ca: Arc<CertificateAuthority>, node_cert_validity: Duration) -> Enroller {
        Enroller { store, ca, node_cert_validity }
    }

    /// Checks and consumes the bootstrap token, chooses the node's name, signs its CSR and records
    /// it, all in one transaction, so a token admits exactly one node even under races. A refused
    /// request writes nothing: the token stays usable by the machine it was meant for.
    pub fn enroll(&self, req: &EnrollRequest) -> Result<Admitted, Refusal> {
        let Some((token_id, secret)) = parse_token(&req.token) else {
            return Err(refusal(
                RefusalCode::TokenUnknown,
                "the bootstrap token is not of the form <6 chars>.<16 chars>",
            ));
        };
        if let Some(name) = &req.requested_name {
            validate_node_name(name).map_err(|e| refusal(RefusalCode::MalformedRequest, e.to_string()))?;
        }
        let now = now_unix();
        self.store.write(|tx| {
            let mut token = usable_token(tx, token_id, secret, now)?;
            if let Some(bound) = token.provider.as_ref().filter(|bound| **bound != req.provider) {
                return Err(refusal(
                    RefusalCode::IdentityMismatch,
                    format!(
                        "token {token_id} is for the machine the coordinator knows as {}; this machine presented {}",
                        describe_provider(bound),
                        describe_provider(&req.provider)
                    ),
                ));
            }
            let (name, replaced) = match &token.reenroll {
                Some(binding) => {
                    if let Some(asked) = req.requested_name.as_ref().filter(|asked| **asked != binding.node) {
                        return Err(refusal(
                            RefusalCode::IdentityMismatch,
                            format!(
                                "token {token_id} re-enrolls node {} only, not {asked}: drop --node-name or mint a \
                                 token for {asked}",
                                binding.node
                            ),
                        ));
                    }
                    if binding.provider != ProviderIdentity::None && binding.provider != req.provider {
                        return Err(refusal(
                            RefusalCode::IdentityMismatch,
                            format!(
                                "token {token_id} re-enrolls node {} on the machine the coordinator knows as {}; \
                                 this machine presented {}",
                                binding.node,
                                describe_provider(&binding.provider),
                                describe_provider(&req.provider)
                            ),
                        ));
                    }
                    (binding.node.clone(), tx.node(&binding.node)?)
                }
                None => (self.fresh_name(tx, req, token_id)?, None),
            };
            let issued = self.sign(&req.csr_der, &name)?;
            // A re-enrolled node keeps its tenants only in the pool they were placed in.
            let tenants = replaced
                .as_ref()
                .filter(|previous| previous.pool == token.pool)
                .map(|previous| previous.spec.tenants.clone())
                .unwrap_or_default();
            let generation = replaced.as_ref().map_or(0, |p| p.spec.generation) + 1;
            let record = NodeRecord {
                name: name.clone(),
                pool: token.pool.clone(),
                hostname: req.hostname.clone(),
                machine_id: req.machine_id.clone(),
                provider: req.provider.clone(),
                enrolled_at_unix: now,
                token_id: token_id.to_string(),
                cert_serial: issued.serial.clone(),
                previous_cert_serial: None,
                cert_not_after_unix: issued.not_after_unix,
                health: Health::Pending,
                health_since_unix: now,
                spec: NodeSpec::build(&name, &token.pool, generation, tenants),
                cordoned: replaced.as_ref().is_some_and(|p| p.cordoned),
                node_class: token.node_class.clone(),
                address: None,
                revoked_at_unix: None,
            };
            tx.put_node(&record)?;
            token.state = TokenState::Used { node: name, at_unix: now };
            tx.put_token(&token)?;
            let enrolled = Enrolled {
                node_name: record.name.clone(),
                pool: record.pool.clone(),
                cert_chain_der: vec![issued.cert_der.to_vec()],
                ca_der: self.ca.cert_der().to_vec(),
            };
            Ok(Admitted { record, enrolled, replaced })
        })
    }

    /// The name a node enrolling with an ordinary bootstrap token gets. A name it asked for is its
    /// own only while no enrolled node holds it; a name taken from its hostname gets a numbered
    /// suffix instead (`worker`, `worker-2`, ...), since clones share hostnames.
    fn fresh_name(&self, tx: &Tx<'_>, req: &EnrollRequest, token_id: &str) -> Result<String, Refusal> {
        let base = match &req.requested_name {
            Some(name) => name.clone(),
            None => node_name_from_hostname(&req.hostname).unwrap_or_else(|| "node".to_string()),
        };
        let Some(holder) = tx.node(&base)? else { return Ok(base) };
        if req.requested_name.is_some() && holder.machine_id == req.machine_id {
            // Looks like the node itself enrolling again; a machine-id proves nothing, so say what does.
            return Err(refusal(
                RefusalCode::NameTaken,
                format!(
                    "node {base} is already enrolled; a bootstrap token (here {token_id}) never takes over an \
                     enrolled node: re-enroll it with a token from `hexactl node reenroll {base}`, or delete it \
                     first with `hexactl node delete {base}`"
                ),
            ));
        }
        for n in 2u32.. {
            let candidate = format!("{}-{n}", truncate(&base, 56));
            if tx.node(&candidate)?.is_none() {
                tracing::warn!(asked = %base, given = %candidate, "node name taken; enrolling under a fresh name");
                return Ok(candidate);
            }
        }
        Err(refusal(RefusalCode::Internal, "no free node name"))
    }

    fn sign(&self, csr_der: &[u8], name: &str) -> Result<Issued, Refusal> {
        self.ca
            .sign_node_csr(csr_der, name, self.node_cert_validity)
            .map_err(|e| refusal(RefusalCode::MalformedRequest, e.to_string()))
    }

    /// Signs a renewal CSR for `name`. The caller has checked that the connection asking holds one
    /// of the node's valid certificates.
    pub fn sign_renewal(&self, name: &str, csr_der: &[u8]) -> Result<Issued, Refusal> {
        self.sign(csr_der, name)
    }
}

/// The token `token_id` if `secret` matches it and it may still be used.
fn usable_token(tx: &Tx<'_>, token_id: &str, secret: &str, now: i64) -> Result<TokenRecord, Refusal> {
    let unknown = || {
        refusal(
            RefusalCode::TokenUnknown,
            format!("bootstrap token {token_id} is not known: mint one with `hexactl token create`"),
        )
    };
    let token = tx.token(token_id)?.ok_or_else(unknown)?;
    if !hashes_equal(&token.secret_sha256, &sha256_hex(secret)) {
        return Err(unknown());
    }
    match &token.state {
        TokenState::Used { node, .. } => Err(refusal(
            RefusalCode::TokenUsed,
            format!(
                "bootstrap token {token_id} was already used by node {node}; tokens are single use: mint a new one"
            ),
        )),
        TokenState::Revoked { .. } => {
            Err(refusal(RefusalCode::TokenRevoked, format!("bootstrap token {token_id} was revoked")))
        }
        TokenState::Active if token.expires_at_unix <= now => Err(refusal(
            RefusalCode::TokenExpired,
            format!("bootstrap token {token_id} expired {}s ago: mint a new one", now - token.expires_at_unix),
        )),
        TokenState::Active => Ok(token),
    }
}

fn describe_provider(provider: &ProviderIdentity) -> String {
    match provider {
        ProviderIdentity::None => "no provider identity".to_string(),
        ProviderIdentity::Proxmox { vmid, smbios_uuid } => format!("Proxmox VM {vmid} (SMBIOS uuid {smbios_uuid})"),
    }
}

fn truncate(s: &str, n: usize) -> &str {
    &s[..s.len().min(n)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ReenrollBinding;
    use crate::tokens::{self, TokenRequest};
    use hexa_shared::names::Pool;

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Store,
        enroller: Enroller,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let (ca, _) = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let enroller = Enroller::new(store.clone(), Arc::new(ca), Duration::from_secs(3600));
        Fixture { _dir: dir, store, enroller }
    }

    fn token(store: &Store, pool: Pool) -> String {
        let req = TokenRequest { pool, ttl: Duration::from_secs(60), description: String::new(), node_class: None };
        tokens::create(store, req, &[]).unwrap().token
    }

    fn request(token: &str, name: Option<&str>, machine_id: &str) -> EnrollRequest {
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap();
        EnrollRequest {
            protocol_version: hexa_shared::proto::PROTOCOL_VERSION,
            agent_version: "test".into(),
            token: token.into(),
            csr_der: csr.der().to_vec(),
            hostname: "worker.example".into(),
            machine_id: machine_id.into(),
            requested_name: name.map(String::from),
            provider: ProviderIdentity::None,
        }
    }

    #[test]
    fn a_bootstrap_token_never_takes_an_enrolled_name() {
        let f = fixture();
        let first = f.enroller.enroll(&request(&token(&f.store, Pool::Shared), Some("victim"), "m1")).unwrap();
        assert_eq!(first.record.name, "victim");
        // The same name and machine-id with another pool's token: refused, and the token stays unused.
        let other = token(&f.store, Pool::Server);
        let refused = f.enroller.enroll(&request(&other, Some("victim"), "m1")).unwrap_err();
        assert_eq!(refused.code, RefusalCode::NameTaken, "{}", refused.message);
        assert!(refused.message.contains("hexactl node reenroll victim"), "{}", refused.message);
        assert_eq!(f.store.nodes().unwrap()["victim"].cert_serial, first.record.cert_serial);
        let id = other.split('.').next().unwrap();
        assert_eq!(f.store.tokens().unwrap()[id].state, TokenState::Active);
        // Another machine asking for the name gets a fresh one; so does a hostname-derived name.
        let renamed = f.enroller.enroll(&request(&token(&f.store, Pool::Shared), Some("victim"), "m2")).unwrap();
        assert_eq!(renamed.record.name, "victim-2");
        assert!(renamed.replaced.is_none() && renamed.record.spec.tenants.is_empty());
        let by_host = f.enroller.enroll(&request(&token(&f.store, Pool::Shared), None, "m1")).unwrap();
        let again = f.enroller.enroll(&request(&token(&f.store, Pool::Shared), None, "m1")).unwrap();
        assert_eq!((by_host.record.name.as_str(), again.record.name.as_str()), ("worker", "worker-2"));
    }

    #[test]
    fn a_reenrollment_token_enrolls_its_node_only() {
        let f = fixture();
        let first = f.enroller.enroll(&request(&token(&f.store, Pool::Shared), Some("node-r"), "m1")).unwrap();
        let reenroll = |f: &Fixture| tokens::create_reenroll(&f.store, &first.record, Duration::from_secs(60)).unwrap();
        let wrong_name = f.enroller.enroll(&request(&reenroll(&f).token, Some("other"), "m1")).unwrap_err();
        assert_eq!(wrong_name.code, RefusalCode::IdentityMismatch);
        let again = f.enroller.enroll(&request(&reenroll(&f).token, None, "m9")).unwrap();
        assert_eq!(again.record.name, "node-r");
        assert_eq!(again.record.pool, Pool::Shared);
        assert_ne!(again.record.cert_serial, first.record.cert_serial);
        assert_eq!(again.record.previous_cert_serial, None, "the old certificate is dead at once");
        assert!(again.record.spec.generation > first.record.spec.generation);
        assert_eq!(again.replaced.map(|r| r.cert_serial), Some(first.record.cert_serial.clone()));
    }

    #[test]
    fn a_reenrollment_token_bound_to_a_provider_identity_wants_that_identity() {
        let f = fixture();
        let mut record = f.enroller.enroll(&request(&token(&f.store, Pool::Shared), Some("vm-1"), "m")).unwrap().record;
        record.provider = ProviderIdentity::Proxmox { vmid: 101, smbios_uuid: "u-101".into() };
        let created = tokens::create_reenroll(&f.store, &record, Duration::from_secs(60)).unwrap();
        let stored = &f.store.tokens().unwrap()[&created.id];
        assert_eq!(stored.reenroll, Some(ReenrollBinding { node: "vm-1".into(), provider: record.provider.clone() }));
        let mut req = request(&created.token, None, "m");
        req.provider = ProviderIdentity::Proxmox { vmid: 102, smbios_uuid: "u-102".into() };
        let refused = f.enroller.enroll(&req).unwrap_err();
        assert_eq!(refused.code, RefusalCode::IdentityMismatch);
        assert!(
            refused.message.contains("Proxmox VM 101") && refused.message.contains("VM 102"),
            "{}",
            refused.message
        );
        req.provider = record.provider.clone();
        assert_eq!(f.enroller.enroll(&req).unwrap().record.name, "vm-1");
    }

    #[test]
    fn a_vm_token_enrolls_only_the_vm_it_was_minted_for() {
        let f = fixture();
        let vm = ProviderIdentity::Proxmox { vmid: 105, smbios_uuid: "u-105".into() };
        let created = token(&f.store, Pool::Dedicated { tenant: "acme".into() });
        let id = created.split('.').next().unwrap().to_string();
        f.store
            .write::<_, crate::store::StoreError>(|tx| {
                let mut record = tx.token(&id)?.unwrap();
                record.provider = Some(vm.clone());
                tx.put_token(&record)
            })
            .unwrap();
        // Another VM, or a machine with no identity: refused, and the token stays usable.
        for other in [ProviderIdentity::Proxmox { vmid: 106, smbios_uuid: "u-105".into() }, ProviderIdentity::None] {
            let mut req = request(&created, Some("hx-vm"), "m");
            req.provider = other;
            let refused = f.enroller.enroll(&req).unwrap_err();
            assert_eq!(refused.code, RefusalCode::IdentityMismatch, "{}", refused.message);
            assert!(refused.message.contains("Proxmox VM 105"), "{}", refused.message);
            assert_eq!(f.store.tokens().unwrap()[&id].state, TokenState::Active);
        }
        let mut req = request(&created, Some("hx-vm"), "m");
        req.provider = vm.clone();
        let admitted = f.enroller.enroll(&req).unwrap();
        assert_eq!((admitted.record.name.as_str(), &admitted.record.provider), ("hx-vm", &vm));
        // Once used, it is used, even by the right VM.
        assert_eq!(f.enroller.enroll(&req).unwrap_err().code, RefusalCode::TokenUsed);
    }
}

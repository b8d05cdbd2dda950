//! Bootstrap tokens: minted by an operator, listed without their secrets, revoked, and consumed by
//! exactly one enrollment (see [`crate::inventory::Inventory::enroll`]).

use std::time::Duration;

use serde::Serialize;

use hexa_shared::clock::now_unix;
use hexa_shared::names::Pool;
use hexa_shared::tenant::NodeClass;

use crate::bootstrap::{MintedToken, sha256_hex};
use crate::store::{NodeRecord, ReenrollBinding, Store, StoreError, TokenRecord, TokenState};

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no bootstrap token with id {0:?}")]
    NotFound(String),
    #[error("bootstrap token {id} was already used by node {node}; a used token cannot be revoked")]
    AlreadyUsed { id: String, node: String },
    #[error("ttl must be between 1s and 365d, got {0}")]
    BadTtl(String),
    #[error("ttl {text:?} is not a duration such as 30m or 1h: {reason}")]
    UnreadableTtl { text: String, reason: String },
    #[error("{0}")]
    BadClass(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What `token create` returns: the only time the whole token is shown.
#[derive(Serialize, Debug, Clone, utoipa::ToSchema)]
pub struct CreatedToken {
    #[schema(pattern = "^[a-z0-9]{6}$")]
    pub id: String,
    /// `<id>.<secret>`: give it to the node's agent (`--token`).
    #[schema(pattern = "^[a-z0-9]{6}\\.[a-z0-9]{16}$")]
    pub token: String,
    pub pool: Pool,
    pub description: String,
    pub node_class: Option<String>,
    pub expires_at_unix: i64,
}

/// A token as listings show it: never with its secret or hash.
#[derive(Serialize, Debug, Clone, PartialEq, utoipa::ToSchema)]
pub struct TokenView {
    #[schema(pattern = "^[a-z0-9]{6}$")]
    pub id: String,
    pub pool: Pool,
    pub description: String,
    pub node_class: Option<String>,
    pub created_at_unix: i64,
    pub expires_at_unix: i64,
    /// active, expired, used or revoked
    #[schema(schema_with = status_schema)]
    pub status: &'static str,
    pub used_by: Option<String>,
    /// For re-enrollment tokens: the node they enroll again.
    pub reenrolls: Option<String>,
}

/// The statuses [`TokenView::status`] takes (see `view`).
fn status_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
    ObjectBuilder::new()
        .schema_type(SchemaType::Type(Type::String))
        .enum_values(Some(["active", "expired", "used", "revoked"]))
        .build()
}

/// What a new token admits.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub pool: Pool,
    pub ttl: Duration,
    pub description: String,
    /// For `dedicated:<tenant>` pools: the class of node being admitted (one of the configured
    /// node classes), so placement can bind it.
    pub node_class: Option<String>,
}

/// A token's lifetime as an operator writes it (`30m`, `1h`, `7d`), or `default` when not given.
pub fn parse_ttl(text: Option<&str>, default: Duration) -> Result<Duration, TokenError> {
    match text {
        None => Ok(default),
        Some(text) => humantime::parse_duration(text)
            .map_err(|e| TokenError::UnreadableTtl { text: text.to_string(), reason: e.to_string() }),
    }
}

fn check_ttl(ttl: Duration) -> Result<(), TokenError> {
    if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(365 * 24 * 3600) {
        return Err(TokenError::BadTtl(humantime::format_duration(ttl).to_string()));
    }
    Ok(())
}

pub fn create(store: &Store, req: TokenRequest, classes: &[NodeClass]) -> Result<CreatedToken, TokenError> {
    let TokenRequest { pool, ttl, description, node_class } = req;
    check_ttl(ttl)?;
    if let Some(class) = &node_class {
        if !matches!(pool, Pool::Dedicated { .. }) {
            return Err(TokenError::BadClass(format!("a node class only applies to dedicated pools, not {pool}")));
        }
        if !classes.iter().any(|c| &c.name == class) {
            let known: Vec<&str> = classes.iter().map(|c| c.name.as_str()).collect();
            return Err(TokenError::BadClass(format!(
                "unknown node class {class}: known classes are {}",
                known.join(", ")
            )));
        }
    }
    let minted = mint(store, &pool, &description, node_class.as_ref(), ttl, None)?;
    tracing::info!(token_id = %minted.id, %pool, expires_at_unix = minted.expires_at_unix, "bootstrap token created");
    Ok(CreatedToken {
        id: minted.id.clone(),
        token: minted.token.text(),
        pool,
        description,
        node_class,
        expires_at_unix: minted.expires_at_unix,
    })
}

struct Minted {
    id: String,
    token: MintedToken,
    expires_at_unix: i64,
}

fn mint(
    store: &Store,
    pool: &Pool,
    description: &str,
    node_class: Option<&String>,
    ttl: Duration,
    reenroll: Option<ReenrollBinding>,
) -> Result<Minted, StoreError> {
    let now = now_unix();
    let expires_at_unix = now + ttl.as_secs() as i64;
    store.write(|tx| {
        // Ids are short; on the rare collision draw again rather than overwrite.
        loop {
            let minted = MintedToken::generate();
            if tx.token(&minted.id)?.is_none() {
                tx.put_token(&TokenRecord {
                    id: minted.id.clone(),
                    secret_sha256: sha256_hex(&minted.secret),
                    pool: pool.clone(),
                    description: description.to_string(),
                    node_class: node_class.cloned(),
                    created_at_unix: now,
                    expires_at_unix,
                    state: TokenState::Active,
                    reenroll: reenroll.clone(),
                    provider: None,
                })?;
                return Ok(Minted { id: minted.id.clone(), token: minted, expires_at_unix });
            }
        }
    })
}

/// A token that enrolls `node` again, and nothing else: its name, its pool and class, and for a
/// machine known by its provider identity, that identity. The node's current certificate stops
/// opening anything once the token is used.
pub fn create_reenroll(store: &Store, node: &NodeRecord, ttl: Duration) -> Result<CreatedToken, TokenError> {
    check_ttl(ttl)?;
    let description = format!("re-enrollment of node {}", node.name);
    let binding = ReenrollBinding { node: node.name.clone(), provider: node.provider.clone() };
    let minted = mint(store, &node.pool, &description, node.node_class.as_ref(), ttl, Some(binding))?;
    tracing::info!(token_id = %minted.id, node = %node.name, pool = %node.pool, "re-enrollment token created");
    Ok(CreatedToken {
        id: minted.id,
        token: minted.token.text(),
        pool: node.pool.clone(),
        description,
        node_class: node.node_class.clone(),
        expires_at_unix: minted.expires_at_unix,
    })
}

pub fn view(record: &TokenRecord, now: i64) -> TokenView {
    let (status, used_by) = match &record.state {
        TokenState::Used { node, .. } => ("used", Some(node.clone())),
        TokenState::Revoked { .. } => ("revoked", None),
        TokenState::Active if record.expires_at_unix <= now => ("expired", None),
        TokenState::Active => ("active", None),
    };
    TokenView {
        id: record.id.clone(),
        pool: record.pool.clone(),
        description: record.description.clone(),
        node_class: record.node_class.clone(),
        created_at_unix: record.created_at_unix,
        expires_at_unix: record.expires_at_unix,
        status,
        used_by,
        reenrolls: record.reenroll.as_ref().map(|b| b.node.clone()),
    }
}

pub fn list(store: &Store) -> Result<Vec<TokenView>, TokenError> {
    let now = now_unix();
    Ok(store.tokens()?.values().map(|r| view(r, now)).collect())
}

pub fn revoke(store: &Store, id: &str) -> Result<TokenView, TokenError> {
    let record = store.write(|tx| {
        let mut record = tx.token(id)?.ok_or_else(|| TokenError::NotFound(id.to_string()))?;
        match &record.state {
            TokenState::Used { node, .. } => {
                return Err(TokenError::AlreadyUsed { id: id.to_string(), node: node.clone() });
            }
            TokenState::Revoked { .. } => {}
            TokenState::Active => {
                record.state = TokenState::Revoked { at_unix: now_unix() };
                tx.put_token(&record)?;
            }
        }
        Ok(record)
    })?;
    tracing::info!(token_id = %id, "bootstrap token revoked");
    Ok(view(&record, now_unix()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(pool: Pool, ttl_secs: u64) -> TokenRequest {
        TokenRequest { pool, ttl: Duration::from_secs(ttl_secs), description: "rack 3".into(), node_class: None }
    }

    #[test]
    fn tokens_are_stored_hashed_and_listed_without_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let created = create(&store, req(Pool::Shared, 60), &[]).unwrap();
        let stored = store.tokens().unwrap();
        let record = &stored[&created.id];
        let secret = created.token.split_once('.').unwrap().1;
        assert_ne!(record.secret_sha256, secret);
        assert_eq!(record.secret_sha256, sha256_hex(secret));
        let bytes = std::fs::read(dir.path().join("s.redb")).unwrap();
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "secret found on disk");
        let listed = list(&store).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].status, "active");
        assert!(!serde_json::to_string(&listed).unwrap().contains(secret));
    }

    #[test]
    fn revoke_and_its_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let created = create(&store, req(Pool::Server, 60), &[]).unwrap();
        assert_eq!(revoke(&store, &created.id).unwrap().status, "revoked");
        assert!(matches!(revoke(&store, "zzzzzz"), Err(TokenError::NotFound(_))));
        assert!(matches!(create(&store, req(Pool::Shared, 0), &[]), Err(TokenError::BadTtl(_))));
        let classes = NodeClass::defaults();
        let mut shared_with_class = req(Pool::Shared, 60);
        shared_with_class.node_class = Some("M".into());
        assert!(matches!(create(&store, shared_with_class, &classes), Err(TokenError::BadClass(_))));
        let mut unknown = req(Pool::Dedicated { tenant: "acme".into() }, 60);
        unknown.node_class = Some("XL".into());
        let err = create(&store, unknown, &classes).unwrap_err().to_string();
        assert!(err.contains("known classes are S, M, L"), "{err}");
    }

    #[test]
    fn expired_tokens_list_as_expired() {
        let record = TokenRecord {
            id: "abcdef".into(),
            secret_sha256: String::new(),
            pool: Pool::Shared,
            description: String::new(),
            node_class: None,
            created_at_unix: 0,
            expires_at_unix: 10,
            state: TokenState::Active,
            reenroll: None,
            provider: None,
        };
        assert_eq!(view(&record, 10).status, "expired");
        assert_eq!(view(&record, 9).status, "active");
    }
}

//! Errors as the admin API returns them: `{"error": {"code", "message"}}`, with a code per kind of
//! failure and a message in the API's terms (field names, JSON types), never Rust's.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use hexa_shared::names::NameError;
use hexa_shared::tenant::TenantError;

use crate::placement::PlacementError;
use crate::tenants::TenantsError;
use crate::tokens::TokenError;

/// Longest message returned; longer ones (a huge name echoed back) are cut at a character boundary.
pub const MAX_MESSAGE: usize = 512;

/// What kind of failure an error is; a program matches on this, a person reads the message.
#[derive(Serialize, ToSchema, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the body is not JSON, or a value in it is not acceptable (pool, ttl, node class).
    BadRequest,
    /// 400 or 422: a tenant or pool name breaks the naming rules.
    InvalidName,
    /// 422: the JSON does not match the request's schema (missing or unknown field, wrong type).
    InvalidBody,
    /// 413: the body is larger than the API accepts.
    PayloadTooLarge,
    /// 415: the body is not sent as `application/json`.
    UnsupportedMediaType,
    /// 401: the bearer token is missing or wrong.
    Unauthorized,
    /// 404: no such endpoint, node, token or tenant.
    NotFound,
    /// 405: the path exists, but not with this method (`Allow` lists those it has).
    MethodNotAllowed,
    /// 409: the request conflicts with the current state (name taken, token used, still deleting).
    Conflict,
    /// 409: not enough free capacity for the plan; the message says what is missing.
    InsufficientCapacity,
    /// 422: the plan is not valid (a zero quota, replicas other than 1 or 3, unknown node class...).
    InvalidPlan,
    /// 422: a share of the plan is larger than any node could hold.
    Unplaceable,
    /// 500: the coordinator failed; its log says why.
    Internal,
    /// 503: the state store cannot take the request now (etcd without a quorum, or this
    /// coordinator no longer leads); nothing was written.
    Unavailable,
}

/// The body of every error response.
#[derive(Serialize, ToSchema, Debug, Clone, PartialEq, Eq)]
#[schema(as = Error)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema, Debug, Clone, PartialEq, Eq)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    /// What was wrong, with which value, and what to do next.
    #[schema(max_length = 518)]
    pub message: String,
}

/// An error as the API returns it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError { status, code, message: truncate(message.into(), MAX_MESSAGE) }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
    }

    pub(crate) fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message)
    }

    pub(crate) fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::MethodNotAllowed,
            "this path does not take that method: the Allow header lists those it takes; see /v1/openapi.json",
        )
    }

    fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, ErrorCode::Conflict, message)
    }

    fn internal(e: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %e, "admin request failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, "the coordinator failed; see its log")
    }

    /// The body this error is returned with.
    pub fn body(&self) -> ErrorBody {
        ErrorBody { error: ErrorDetail { code: self.code, message: self.message.clone() } }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        match e {
            JsonRejection::JsonDataError(e) => {
                // axum's text is "Failed to deserialize the JSON body into the target type: <path>: <serde>".
                let text = e.body_text();
                let detail = text.split_once(": ").map_or(text.as_str(), |(_, rest)| rest);
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    ErrorCode::InvalidBody,
                    format!("the request body does not match the request schema: {}", api_terms(detail)),
                )
            }
            JsonRejection::JsonSyntaxError(e) => {
                let text = e.body_text();
                let detail = text.split_once(": ").map_or(text.as_str(), |(_, rest)| rest);
                ApiError::bad_request(format!("the request body is not valid JSON: {}", api_terms(detail)))
            }
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorCode::UnsupportedMediaType,
                "send the request body as JSON with `Content-Type: application/json`",
            ),
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::PayloadTooLarge,
                format!("the request body is larger than the {} bytes the admin API accepts", super::MAX_BODY),
            ),
            other => ApiError::bad_request(format!("the request body could not be read: {}", other.body_text())),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        ApiError::bad_request(format!("the path is not valid: {}", api_terms(&e.body_text())))
    }
}

fn name_error(status: StatusCode, e: &NameError) -> ApiError {
    match e {
        NameError::UnknownPool(_) => ApiError::new(status, ErrorCode::BadRequest, e.to_string()),
        NameError::Invalid { .. } => ApiError::new(status, ErrorCode::InvalidName, e.to_string()),
    }
}

impl From<NameError> for ApiError {
    /// A name in a request body that breaks the rules (a pool's tenant, say).
    fn from(e: NameError) -> Self {
        name_error(StatusCode::BAD_REQUEST, &e)
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::store(&e)
    }
}

impl ApiError {
    /// A failed read or write of the state: one the store cannot take now (etcd without a quorum,
    /// a deposed leader) is 503 and says why, which an operator can act on; anything else is 500.
    fn store(e: &crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match e {
            StoreError::NotLeader { .. } | StoreError::Etcd { .. } => {
                tracing::error!(error = %e, "admin request refused: the state store cannot take it");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, e.to_string())
            }
            _ => ApiError::internal(e),
        }
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::NotFound(_) => ApiError::not_found(e.to_string()),
            TokenError::AlreadyUsed { .. } => ApiError::conflict(e.to_string()),
            TokenError::BadTtl(_) | TokenError::UnreadableTtl { .. } | TokenError::BadClass(_) => {
                ApiError::bad_request(e.to_string())
            }
            TokenError::Store(e) => ApiError::store(&e),
        }
    }
}

impl From<TenantsError> for ApiError {
    fn from(e: TenantsError) -> Self {
        let message = e.to_string();
        let unprocessable = |code| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message.clone());
        match e {
            TenantsError::NotFound(_) | TenantsError::NoNode(_) => ApiError::not_found(message),
            TenantsError::StillDeleting(_) => ApiError::conflict(message),
            TenantsError::Store(e) => ApiError::store(&e),
            TenantsError::Placement(p) => match p {
                PlacementError::InvalidPlan { source: TenantError::Name(_), .. } => {
                    unprocessable(ErrorCode::InvalidName)
                }
                PlacementError::InvalidPlan { .. } => unprocessable(ErrorCode::InvalidPlan),
                PlacementError::ShareTooLarge { .. } => unprocessable(ErrorCode::Unplaceable),
                PlacementError::TenantExists { .. } => ApiError::conflict(message),
                PlacementError::UnknownTenant { .. } | PlacementError::UnknownNode { .. } => {
                    ApiError::not_found(message)
                }
                PlacementError::NoSharedNodes { .. }
                | PlacementError::TooFewNodes { .. }
                | PlacementError::NoRoom { .. } => {
                    ApiError::new(StatusCode::CONFLICT, ErrorCode::InsufficientCapacity, message)
                }
                PlacementError::InvalidConfig(_) | PlacementError::DuplicateNode { .. } => ApiError::internal(&p),
            },
        }
    }
}

/// Cuts `text` to at most `max` bytes at a character boundary, marking the cut.
fn truncate(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(" [...]");
    text
}

/// Rust's words in serde's messages, and what the API calls them.
const TERMS: &[(&str, &str)] = &[
    ("u8", "an integer from 0 to 255"),
    ("u16", "an integer from 0 to 65535"),
    ("u32", "an integer from 0 to 4294967295"),
    ("u64", "an integer from 0 to 18446744073709551615"),
    ("i32", "an integer"),
    ("i64", "an integer"),
    ("f32", "a number"),
    ("f64", "a number"),
    ("usize", "a non-negative integer"),
    ("a borrowed string", "a string"),
    ("a sequence", "an array"),
    ("a map", "an object"),
    ("unit", "null"),
];

/// Rewrites serde's and axum's texts in the API's terms: a Rust integer type becomes its range, a
/// struct or enum (`struct CreateTenantRequest`, `internally tagged enum Plan`) an object, and the
/// rest is left as it is (field names and variants are already the API's).
pub fn api_terms(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        // A Rust type name following one of serde's type words.
        if let Some((word, replacement)) = [
            ("internally tagged enum ", "an object with a `kind`"),
            ("tuple struct ", "an array"),
            ("struct variant ", "an object"),
            ("struct ", "an object"),
            ("enum ", "one of the listed values"),
        ]
        .iter()
        .find(|(word, _)| rest.starts_with(word) && at_word_start(text, rest))
        {
            let after = &rest[word.len()..];
            let ident_len = after.bytes().take_while(|b| b.is_ascii_alphanumeric() || *b == b'_').count();
            if ident_len > 0 && after.as_bytes()[0].is_ascii_uppercase() {
                out.push_str(replacement);
                rest = &after[ident_len..];
                continue;
            }
        }
        if let Some((word, replacement)) = TERMS
            .iter()
            .find(|(word, _)| rest.starts_with(word) && at_word_start(text, rest) && at_word_end(&rest[word.len()..]))
        {
            out.push_str(replacement);
            rest = &rest[word.len()..];
            continue;
        }
        let mut chars = rest.chars();
        if let Some(c) = chars.next() {
            out.push(c);
        }
        rest = chars.as_str();
    }
    out
}

/// `rest` (a suffix of `text`) starts a word: `text` has no identifier character just before it.
fn at_word_start(text: &str, rest: &str) -> bool {
    let offset = text.len() - rest.len();
    text[..offset].chars().next_back().is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '`'))
}

fn at_word_end(rest: &str) -> bool {
    rest.chars().next().is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '`'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_that_cannot_take_a_write_now_is_503_saying_why() {
        use crate::store::StoreError;
        let endpoints = "http://10.0.0.1:2379".to_string();
        let deposed = ApiError::from(StoreError::NotLeader { endpoints: endpoints.clone() });
        assert_eq!((deposed.status, deposed.code), (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable));
        assert!(deposed.message.contains("no longer leads") && deposed.message.contains("nothing was written"));
        let no_quorum = ApiError::from(TenantsError::Store(StoreError::Etcd {
            endpoints,
            message: "no member answered within 5s".into(),
        }));
        assert_eq!((no_quorum.status, no_quorum.code), (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable));
        assert!(no_quorum.message.contains("no member answered"), "{}", no_quorum.message);
        // A broken record is the coordinator's failure, not a wait-and-retry: 500, nothing more told.
        let corrupt = ApiError::from(StoreError::Corrupt { key: "nodes/n1".into(), message: "eof".into() });
        assert_eq!((corrupt.status, corrupt.code), (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal));
    }

    #[test]
    fn serde_texts_are_told_in_the_apis_terms() {
        let cases = [
            (
                "invalid type: string \"x\", expected u64 at line 1 column 9",
                "invalid type: string \"x\", expected an integer from 0 to 18446744073709551615 at line 1 column 9",
            ),
            (
                "invalid type: integer `3`, expected struct CreateTenantRequest",
                "invalid type: integer `3`, expected an object",
            ),
            (
                "plan: invalid type: string \"s\", expected internally tagged enum Plan",
                "plan: invalid type: string \"s\", expected an object with a `kind`",
            ),
            (
                "invalid value: integer `300`, expected u8",
                "invalid value: integer `300`, expected an integer from 0 to 255",
            ),
            (
                "unknown field `tll`, expected one of `pool`, `ttl`",
                "unknown field `tll`, expected one of `pool`, `ttl`",
            ),
            ("missing field `u64`", "missing field `u64`"),
            ("invalid type: map, expected a string", "invalid type: map, expected a string"),
            (
                "unknown variant `big`, expected `shared` or `dedicated`",
                "unknown variant `big`, expected `shared` or `dedicated`",
            ),
        ];
        for (serde, api) in cases {
            assert_eq!(api_terms(serde), api, "{serde}");
        }
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let error = ApiError::not_found(format!("no node named {:?}", "é".repeat(600)));
        assert!(error.message().len() <= MAX_MESSAGE + " [...]".len());
        assert!(error.message().ends_with(" [...]"));
        let short = ApiError::not_found("no node named \"a\"");
        assert_eq!(short.message(), "no node named \"a\"");
    }
}

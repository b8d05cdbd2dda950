//! `/v1/tokens`: bootstrap tokens, minted, listed without their secrets, and revoked.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use hexa_shared::names::Pool;

use super::{ApiError, Ctx, ErrorBody};
use crate::tokens::{self, CreatedToken, TokenView};

pub(super) fn routes() -> OpenApiRouter<Ctx> {
    OpenApiRouter::new().routes(routes!(list_tokens, create_token)).routes(routes!(revoke_token))
}

/// A request for a bootstrap token.
#[derive(Deserialize, ToSchema, Debug)]
#[serde(deny_unknown_fields)]
#[schema(as = TokenRequest)]
struct CreateTokenRequest {
    /// `server`, `shared` or `dedicated:<tenant>`; another value is a 400 that lists these.
    // Read as a string and parsed apart, so that a bad pool is a 400 that lists the pools (as a
    // bad ttl is), not a 422 of the body's shape.
    #[schema(value_type = Pool)]
    pool: String,
    /// How long the token stays valid, a duration such as `30m`, `1h`, `7d` or `1h 30m` (1s to
    /// 365d); the coordinator's `token_ttl` when absent.
    #[serde(default)]
    #[schema(pattern = "^[0-9]+ *[a-zA-Z]+( *[0-9]+ *[a-zA-Z]+)*$", example = "1h")]
    ttl: Option<String>,
    /// Free text shown in listings, e.g. where the node is.
    #[serde(default)]
    description: String,
    /// Node class (one of the configured ones) for `dedicated:<tenant>` pools.
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9]{1,32}$")]
    node_class: Option<String>,
}

/// Every bootstrap token, without its secret.
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens",
    responses((status = 200, description = "tokens, without secrets", body = Vec<TokenView>)))]
async fn list_tokens(State(ctx): State<Ctx>) -> Result<Json<Vec<TokenView>>, ApiError> {
    Ok(Json(tokens::list(&ctx.store)?))
}

/// Mints a bootstrap token; the whole token is in this answer only.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", request_body = CreateTokenRequest,
    responses(
        (status = 201, description = "the token, shown once", body = CreatedToken),
        (status = 400, description = "the pool, ttl or node class is not valid, or the body is not JSON", body = ErrorBody),
    ))]
async fn create_token(
    State(ctx): State<Ctx>,
    body: Result<Json<CreateTokenRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let Json(req) = body?;
    let pool: Pool = req.pool.parse()?;
    let ttl = tokens::parse_ttl(req.ttl.as_deref(), ctx.default_token_ttl)?;
    let request = tokens::TokenRequest { pool, ttl, description: req.description, node_class: req.node_class };
    let created = tokens::create(&ctx.store, request, &ctx.node_classes)?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// Revokes an unused token.
#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens",
    params(("id" = String, Path, description = "token id, the part of the token before the dot")),
    responses(
        (status = 200, description = "revoked", body = TokenView),
        (status = 404, description = "no such token", body = ErrorBody),
        (status = 409, description = "already used by a node: a used token cannot be revoked", body = ErrorBody),
    ))]
async fn revoke_token(
    State(ctx): State<Ctx>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<TokenView>, ApiError> {
    let Path(id) = id?;
    Ok(Json(tokens::revoke(&ctx.store, &id)?))
}

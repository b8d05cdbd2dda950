//! `/v1/tenants` and `/v1/provisioning`: tenants (one vCluster each), their plans, and the
//! dedicated nodes they wait for.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use hexa_shared::tenant::{Plan, Tenant};

use super::{ApiError, Ctx, ErrorBody};
use crate::placement::ProvisionRequest;

pub(super) fn routes() -> OpenApiRouter<Ctx> {
    OpenApiRouter::new()
        .routes(routes!(list_tenants, create_tenant))
        .routes(routes!(get_tenant, patch_tenant, delete_tenant))
        .routes(routes!(list_provisioning))
}

/// A new tenant.
#[derive(Deserialize, ToSchema, Debug)]
#[serde(deny_unknown_fields)]
#[schema(as = TenantRequest)]
struct CreateTenantRequest {
    /// The tenant's name: it becomes namespace `hx-<name>`.
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$", max_length = 40)]
    name: String,
    plan: Plan,
}

/// A tenant's new plan.
#[derive(Deserialize, ToSchema, Debug)]
#[serde(deny_unknown_fields)]
#[schema(as = PlanChange)]
struct PatchTenantRequest {
    plan: Plan,
}

/// Every tenant with its phase, conditions and placement.
#[utoipa::path(get, path = "/v1/tenants", tag = "tenants",
    responses((status = 200, description = "all tenants with phase, conditions and placement", body = Vec<Tenant>)))]
async fn list_tenants(State(ctx): State<Ctx>) -> Json<Vec<Tenant>> {
    Json(ctx.tenants.list().await)
}

/// Creates a tenant and places it.
#[utoipa::path(post, path = "/v1/tenants", tag = "tenants", request_body = CreateTenantRequest,
    responses(
        (status = 201, description = "the tenant, placed", body = Tenant),
        (status = 409, description = "name taken or still being deleted, or not enough capacity (the message says what is missing)", body = ErrorBody),
        (status = 422, description = "invalid name (`invalid_name`) or plan (`invalid_plan`), a share larger than any node (`unplaceable`), or a body that does not match the schema (`invalid_body`)", body = ErrorBody),
    ))]
async fn create_tenant(
    State(ctx): State<Ctx>,
    body: Result<Json<CreateTenantRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Tenant>), ApiError> {
    let Json(req) = body?;
    Ok((StatusCode::CREATED, Json(ctx.tenants.create(&req.name, req.plan).await?)))
}

/// One tenant.
#[utoipa::path(get, path = "/v1/tenants/{name}", tag = "tenants",
    params(("name" = String, Path, description = "tenant name")),
    responses(
        (status = 200, description = "the tenant", body = Tenant),
        (status = 404, description = "no such tenant", body = ErrorBody),
    ))]
async fn get_tenant(
    State(ctx): State<Ctx>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<Tenant>, ApiError> {
    let Path(name) = name?;
    Ok(Json(ctx.tenants.get(&name).await?))
}

/// Changes a tenant's plan (a resize, or shared <-> dedicated) and re-places it without deleting it.
#[utoipa::path(patch, path = "/v1/tenants/{name}", tag = "tenants", request_body = PatchTenantRequest,
    params(("name" = String, Path, description = "tenant name")),
    responses(
        (status = 200, description = "the tenant, re-placed", body = Tenant),
        (status = 404, description = "no such tenant", body = ErrorBody),
        (status = 409, description = "still being deleted, or not enough capacity for the new plan", body = ErrorBody),
        (status = 422, description = "invalid plan (`invalid_plan`), a share larger than any node (`unplaceable`), or a body that does not match the schema (`invalid_body`)", body = ErrorBody),
    ))]
async fn patch_tenant(
    State(ctx): State<Ctx>,
    name: Result<Path<String>, PathRejection>,
    body: Result<Json<PatchTenantRequest>, JsonRejection>,
) -> Result<Json<Tenant>, ApiError> {
    let Path(name) = name?;
    let Json(req) = body?;
    Ok(Json(ctx.tenants.change_plan(&name, req.plan).await?))
}

/// Deletes a tenant and everything it has on the host cluster.
#[utoipa::path(delete, path = "/v1/tenants/{name}", tag = "tenants",
    params(("name" = String, Path, description = "tenant name")),
    responses(
        (status = 200, description = "deleted (or being deleted); its last state", body = Tenant),
        (status = 404, description = "no such tenant", body = ErrorBody),
    ))]
async fn delete_tenant(
    State(ctx): State<Ctx>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<Tenant>, ApiError> {
    let Path(name) = name?;
    Ok(Json(ctx.tenants.delete(&name).await?))
}

/// Dedicated nodes asked of the provisioner and not yet registered.
#[utoipa::path(get, path = "/v1/provisioning", tag = "tenants",
    responses((status = 200, description = "outstanding dedicated node requests", body = Vec<ProvisionRequest>)))]
async fn list_provisioning(State(ctx): State<Ctx>) -> Json<Vec<ProvisionRequest>> {
    Json(ctx.tenants.provisioning().await)
}

//! `/v1/tenants` and `/v1/provisioning`: tenants (one vCluster each), their plans, and the
//! dedicated nodes they wait for.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use hexa_shared::tenant::{Plan, Tenant};

use super::{ApiError, Ctx, ErrorBody};
use crate::proxmox::provisioner::{Failure, VmView};

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

/// A tenant's dedicated nodes still on their way, or on their way out.
#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq)]
pub struct ProvisioningRow {
    pub tenant: String,
    pub node_class: String,
    /// Dedicated nodes the tenant's placement still waits for.
    pub count: u32,
    /// Its Proxmox VMs not yet bound, or being removed (with `[proxmox]` configured).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<VmView>,
    /// Its VMs destroyed and replaced for failing, in the last day: what went wrong and where.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<Failure>,
}

/// Dedicated nodes asked of the provisioner and not yet registered, with each VM's state, age,
/// Proxmox node, VMID and last error, and the VMs destroyed and replaced for failing in the last day.
#[utoipa::path(get, path = "/v1/provisioning", tag = "tenants",
    responses((status = 200, description = "outstanding dedicated node requests and their VMs", body = Vec<ProvisioningRow>)))]
async fn list_provisioning(State(ctx): State<Ctx>) -> Json<Vec<ProvisioningRow>> {
    let mut rows: Vec<ProvisioningRow> = ctx
        .tenants
        .provisioning()
        .await
        .into_iter()
        .map(|r| ProvisioningRow {
            tenant: r.tenant,
            node_class: r.node_class,
            count: r.count,
            vms: Vec::new(),
            failures: Vec::new(),
        })
        .collect();
    let vms = ctx.provisioner.as_ref().map(|p| p.views()).unwrap_or_default();
    for vm in vms {
        match rows.iter_mut().find(|r| r.tenant == vm.tenant) {
            Some(row) => row.vms.push(vm),
            None => rows.push(ProvisioningRow {
                tenant: vm.tenant.clone(),
                node_class: vm.node_class.clone(),
                count: 0,
                vms: vec![vm],
                failures: Vec::new(),
            }),
        }
    }
    let failures = ctx.provisioner.as_ref().map(|p| p.failures()).unwrap_or_default();
    let classes = ctx.tenants.list().await;
    for failure in failures {
        match rows.iter_mut().find(|r| r.tenant == failure.tenant) {
            Some(row) => row.failures.push(failure),
            None => {
                let node_class = classes
                    .iter()
                    .find(|t| t.name == failure.tenant)
                    .and_then(|t| match &t.plan {
                        hexa_shared::tenant::Plan::Dedicated(plan) => Some(plan.node_class.clone()),
                        hexa_shared::tenant::Plan::Shared(_) => None,
                    })
                    .unwrap_or_default();
                rows.push(ProvisioningRow {
                    tenant: failure.tenant.clone(),
                    node_class,
                    count: 0,
                    vms: Vec::new(),
                    failures: vec![failure],
                })
            }
        }
    }
    rows.sort_by(|a, b| a.tenant.cmp(&b.tenant));
    Json(rows)
}

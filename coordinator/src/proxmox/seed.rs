//! The NoCloud seed server (`[proxmox] seed_listen`): `/seed/<id>/{meta-data,user-data,vendor-data}`
//! for each VM on its way up, `<id>` 256 random bits. A seed is served only while its VM waits
//! for its agent to enroll and its token is unused; after that, or for any other id, 404.
//! `/packages/hexa-agent.deb` serves `agent_deb` when configured.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::provisioner::Provisioner;
use super::userdata::{self, AgentSeed, Install};

pub const DEB_PATH: &str = "/packages/hexa-agent.deb";

pub fn router(provisioner: Arc<Provisioner>) -> Router {
    Router::new()
        .route("/seed/{id}/{file}", get(seed_file))
        .route(DEB_PATH, get(deb))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(provisioner)
}

/// How the VMs get the agent, from the settings.
pub fn install_of(provisioner: &Provisioner) -> Install {
    let settings = provisioner.settings();
    if !settings.apt_source.is_empty() {
        let key = (!settings.apt_key.is_empty()).then(|| settings.apt_key.clone());
        Install::Apt { source: settings.apt_source.clone(), key }
    } else if !settings.agent_deb.as_os_str().is_empty() {
        Install::Deb { url: format!("{}{DEB_PATH}", provisioner.seed_base()) }
    } else {
        Install::Preinstalled
    }
}

async fn seed_file(State(provisioner): State<Arc<Provisioner>>, Path((id, file)): Path<(String, String)>) -> Response {
    let Some((record, token)) = provisioner.seed(&id) else {
        tracing::info!(file, "seed request for an unknown, used or withdrawn seed");
        return (StatusCode::NOT_FOUND, "no such seed\n").into_response();
    };
    let body = match file.as_str() {
        "meta-data" => userdata::meta_data(&record.smbios_uuid, &record.node_name()),
        "vendor-data" => userdata::VENDOR_DATA.to_string(),
        "user-data" => userdata::user_data(&AgentSeed {
            coordinator: provisioner.settings().coordinator_address.clone(),
            ca_hash: provisioner.ca_hash().to_string(),
            token,
            node_name: record.node_name(),
            node_class: record.node_class.clone(),
            vmid: record.vmid.unwrap_or_default(),
            install: install_of(&provisioner),
        }),
        _ => return (StatusCode::NOT_FOUND, "no such seed file\n").into_response(),
    };
    tracing::info!(record = %record.id, vmid = ?record.vmid, file, "seed served");
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

async fn deb(State(provisioner): State<Arc<Provisioner>>) -> Response {
    let path = &provisioner.settings().agent_deb;
    if path.as_os_str().is_empty() {
        return (StatusCode::NOT_FOUND, "no package configured (proxmox.agent_deb)\n").into_response();
    }
    match tokio::fs::read(path).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/vnd.debian.binary-package")], bytes).into_response(),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot read proxmox.agent_deb");
            (StatusCode::INTERNAL_SERVER_ERROR, "package unreadable\n").into_response()
        }
    }
}

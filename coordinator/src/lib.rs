//! The Hexabase coordinator: enrolls node agents, keeps the node inventory and serves the admin API.
//!
//! [`start`] brings up everything a `hexa-coordinator` process runs and returns a handle; the
//! binary and the tests both go through it.

pub mod admin;
pub mod bootstrap;
pub mod ca_seal;
pub mod config;
pub mod ctl;
pub mod desired;
pub mod enroll;
pub mod follow;
pub mod hostcluster;
pub mod http_server;
pub mod inventory;
pub mod link;
pub mod metrics;
pub mod placement;
pub mod pod_owners;
pub mod proxmox;
pub mod store;
pub mod tenants;
pub mod tokens;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use hexa_shared::fsutil;
use hexa_shared::pki::{self, CaHash};
use hexa_shared::service::ServiceManager;

use crate::bootstrap::{ADMIN_TOKEN_FILE, CertificateAuthority};
use crate::config::CoordinatorConfig;
use crate::inventory::{HealthThresholds, Inventory};
use crate::metrics::Metrics;
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The message includes the cause's, so it is not repeated as a source.
    #[error("invalid configuration: {0}")]
    Config(config::ConfigError),
    #[error("cannot load the tenants from the state database: {0}")]
    Tenants(tenants::TenantsError),
    #[error(transparent)]
    Fs(#[from] fsutil::FsError),
    #[error(transparent)]
    Bootstrap(#[from] bootstrap::BootstrapError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    HostCluster(#[from] hostcluster::reconcile::HostClusterError),
    #[error("cannot set up Proxmox provisioning: {0}")]
    Proxmox(#[from] proxmox::ProxmoxError),
    #[error("cannot listen on {what} {addr}: {error}")]
    Listen { what: &'static str, addr: SocketAddr, error: std::io::Error },
}

/// A running coordinator.
#[derive(Debug)]
pub struct Running {
    pub quic_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub ca_hash: CaHash,
    /// True when this start created the CA (first start on this state dir).
    pub created_ca: bool,
    pub admin_token_path: PathBuf,
    pub inventory: Arc<Inventory>,
    pub tenants: Arc<tenants::Tenants>,
    pub host_cluster: Arc<hostcluster::reconcile::HostCluster>,
    pub metrics: Arc<Metrics>,
    /// The Proxmox provisioner and its seed server's address, when `[proxmox]` is configured.
    pub provisioner: Option<Arc<proxmox::Provisioner>>,
    pub seed_addr: Option<SocketAddr>,
    leadership: store::Leadership,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Resolves once this coordinator no longer leads (see [`store::Leadership::lost`]): its writes are
    /// refused from then on, and it must stop and follow.
    pub async fn deposed(&self) {
        self.leadership.lost().await
    }

    /// Stops accepting, closes every link with a reason, and waits for the tasks to end.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

/// The addresses no pod may reach whatever `[isolation] management_cidrs` says: the
/// coordinator's own (the listeners' addresses, or every address of this machine for a listener on
/// all of them) and its Proxmox endpoint's. Loopback is left out (no pod reaches a host's loopback).
fn own_addresses(config: &CoordinatorConfig) -> Vec<std::net::Ipv4Addr> {
    let mut addresses = std::collections::BTreeSet::new();
    if let Some(proxmox) = &config.proxmox {
        let endpoint = reqwest::Url::parse(&proxmox.endpoint).ok();
        let host = endpoint.as_ref().and_then(|u| Some((u.host_str()?.to_string(), u.port_or_known_default()?)));
        match host.map(|(host, port)| std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))) {
            Some(Ok(resolved)) => addresses.extend(resolved.filter_map(|a| match a.ip() {
                std::net::IpAddr::V4(ip) if !ip.is_loopback() => Some(ip),
                _ => None,
            })),
            Some(Err(e)) => {
                tracing::warn!(endpoint = %proxmox.endpoint, error = %e, "cannot resolve the Proxmox endpoint; pods are kept from it only by management_cidrs")
            }
            None => {}
        }
    }
    for listen in [config.quic_listen.ip(), config.admin_listen.ip()] {
        match listen {
            std::net::IpAddr::V4(ip) if ip.is_unspecified() => match nix::ifaddrs::getifaddrs() {
                Ok(interfaces) => addresses.extend(
                    interfaces
                        .filter_map(|i| i.address.and_then(|a| a.as_sockaddr_in().map(|s| s.ip())))
                        .filter(|ip| !ip.is_loopback()),
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list this machine's addresses; pods are kept from the configured management networks only")
                }
            },
            std::net::IpAddr::V4(ip) if !ip.is_loopback() => {
                addresses.insert(ip);
            }
            _ => {}
        }
    }
    addresses.into_iter().collect()
}

/// Reads the admin token file, creating it (0600) when missing (or, on etcd, taking the shared one),
/// records its hash in the store and returns it.
fn admin_token_hash(config: &CoordinatorConfig, store: &Store) -> Result<String, StartError> {
    let path = config.state_dir.join(ADMIN_TOKEN_FILE);
    let local = std::fs::read_to_string(&path).ok().filter(|text| !text.trim().is_empty());
    let hash = match local {
        Some(text) => bootstrap::sha256_hex(text.trim()),
        None => {
            // Coordinators sharing one etcd share one admin token: one that has none yet takes
            // the stored one rather than making a token no client has.
            let shared = match config.store.backend {
                store::BackendKind::Etcd => store.meta::<String>("admin_token_sha256")?,
                store::BackendKind::Redb => None,
            };
            match shared {
                Some(hash) => {
                    tracing::warn!(
                        path = %path.display(),
                        "no admin token here: the coordinators' shared one is in force; copy admin.token from \
                         the coordinator that made it for hexactl on this machine"
                    );
                    return Ok(hash);
                }
                None => {
                    let hash = bootstrap::create_admin_token(&config.state_dir)?;
                    tracing::info!(path = %path.display(), "admin token created");
                    hash
                }
            }
        }
    };
    store.set_meta("admin_token_sha256", &hash)?;
    Ok(hash)
}

/// One of the K3s cluster's secrets: made on first start, then kept in the state database (in the
/// coordinator's private state directory), because every node must keep presenting the same one.
fn k3s_secret(store: &Store, key: &str) -> Result<String, StartError> {
    if let Some(secret) = store.meta::<String>(key)? {
        return Ok(secret);
    }
    let secret = bootstrap::random_secret();
    store.set_meta(key, &secret)?;
    Ok(secret)
}

/// The listeners, bound before a coordinator leads, so that a follower can answer on them, and
/// handed over to the leader's tasks once it leads. The QUIC endpoint takes no connection until
/// it is given `server_config`: while a coordinator loads its state, a fleet coming back costs it
/// a stateless answer per packet, not handshakes it could not serve yet.
struct Listeners {
    endpoint: quinn::Endpoint,
    server_config: quinn::ServerConfig,
    quic_addr: SocketAddr,
    admin: Arc<tokio::net::TcpListener>,
    admin_addr: SocketAddr,
}

/// The receive buffer the QUIC socket asks for. Every agent's packets arrive on this one socket:
/// with the kernel's default (208 KiB) a burst (a fleet reconnecting, thousands of reports in
/// the same millisecond) overflows it and the kernel drops packets, which QUIC then resends late,
/// links fall silent and agents reconnect, making the next burst. 8 MiB holds a few hundred
/// milliseconds of 10,000 agents' reports. The kernel caps it at `net.core.rmem_max`, which the
/// package raises (`packaging/sysctl`).
const QUIC_RECEIVE_BUFFER: usize = 8 << 20;

fn quic_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Err(e) = socket.set_recv_buffer_size(QUIC_RECEIVE_BUFFER) {
        tracing::warn!(error = %e, "cannot enlarge the QUIC socket's receive buffer");
    }
    // Linux reports twice what it grants (the other half is its bookkeeping).
    let granted = socket.recv_buffer_size()? / 2;
    if granted < QUIC_RECEIVE_BUFFER {
        tracing::info!(
            granted_kib = granted >> 10,
            wanted_kib = QUIC_RECEIVE_BUFFER >> 10,
            "the QUIC receive buffer is smaller than wanted: with many agents, raise net.core.rmem_max"
        );
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

async fn bind(config: &CoordinatorConfig, ca: &CertificateAuthority) -> Result<Listeners, StartError> {
    let (chain, key) = ca.issue_server_cert()?;
    let server_config = pki::server_config(ca.cert_der(), chain, key)?;
    let quic = |error| StartError::Listen { what: "QUIC", addr: config.quic_listen, error };
    let socket = quic_socket(config.quic_listen).map_err(quic)?;
    let runtime = quinn::default_runtime().ok_or_else(|| quic(std::io::Error::other("no async runtime")))?;
    let endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime).map_err(quic)?;
    let quic_addr = endpoint.local_addr().map_err(quic)?;
    let admin = |error| StartError::Listen { what: "admin HTTP", addr: config.admin_listen, error };
    let listener = tokio::net::TcpListener::bind(config.admin_listen).await.map_err(admin)?;
    let admin_addr = listener.local_addr().map_err(admin)?;
    Ok(Listeners { endpoint, server_config, quic_addr, admin: Arc::new(listener), admin_addr })
}

/// How long a follower waits before campaigning again after a campaign failed (etcd without a
/// quorum, a lease that lapsed while it waited).
const CAMPAIGN_RETRY: Duration = Duration::from_secs(1);

/// Waits until this coordinator leads the ones sharing its state (at once on redb, where it is the
/// only one). Meanwhile it follows: READY as a standby, feeding the watchdog, sending agents to the
/// leader and serving the admin API as a follower on `listeners`; a campaign that fails (etcd
/// without a quorum) is tried again, for as long as it takes.
async fn lead(
    config: &CoordinatorConfig,
    store: &Store,
    service: &ServiceManager,
    listeners: &Listeners,
) -> Result<store::Leadership, StartError> {
    if config.store.backend != store::BackendKind::Etcd {
        return Ok(store.campaign("", config.store.lease_ttl)?);
    }
    let who = serde_json::to_string(&follow::Advertised::of(config)).unwrap_or_default();
    service.ready(&format!("following: waiting to lead the coordinators on {}", store.location()));
    tracing::info!(store = %store.location(), "waiting to lead: another coordinator may lead now");
    let (stop, stopped) = watch::channel(false);
    let leader = follow::watch_leader(store.clone(), stopped.clone());
    listeners.endpoint.set_server_config(Some(listeners.server_config.clone()));
    let follower_api =
        admin::FollowerContext::new(store.clone(), leader.clone(), config.placement.node_classes.clone());
    let following = [
        tokio::spawn(link::serve_following(
            listeners.endpoint.clone(),
            leader.clone(),
            config.admission,
            Arc::new(Metrics::default()),
            stopped.clone(),
        )),
        tokio::spawn(http_server::serve(
            listeners.admin.clone(),
            admin::follower_router(Arc::new(follower_api)),
            http_server::HttpLimits::default(),
            stopped,
        )),
    ];
    let ttl = config.store.lease_ttl;
    let leadership = loop {
        let campaigning = store.clone();
        let who = who.clone();
        let mut campaign = tokio::task::spawn_blocking(move || campaigning.campaign(&who, ttl));
        let won = loop {
            service.ping();
            let status = match &*leader.borrow() {
                Ok(leader) => format!("following the leader at {} (admin {})", leader.quic, leader.admin),
                Err(why) => format!("following: no leader now ({why})"),
            };
            service.status(&status);
            let next_ping = service
                .next_ping()
                .map_or(Duration::from_secs(3600), |at| at.saturating_duration_since(std::time::Instant::now()));
            tokio::select! {
                won = &mut campaign => break won,
                _ = tokio::time::sleep(next_ping.min(follow::LEADER_POLL)) => {}
            }
        };
        match won {
            Ok(Ok(leadership)) => break leadership,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot campaign to lead; trying again");
                service.status(&format!("following: cannot campaign to lead ({e}); trying again"));
            }
            Err(e) => tracing::error!(error = %e, "the campaign stopped; trying again"),
        }
        tokio::time::sleep(CAMPAIGN_RETRY).await;
    };
    // The follower's answers end (requests already taken finish) before the leader's start.
    listeners.endpoint.set_server_config(None);
    let _ = stop.send(true);
    for task in following {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    tracing::info!(key = %leadership.key, revision = leadership.revision, "leading the coordinators");
    Ok(leadership)
}

/// Spawns a task that runs `pass` every `period` (the first at once) until `shutdown` changes or
/// its sender is gone. A pass that overruns delays the next one rather than bunching them up, and
/// a pass under way finishes before the task ends.
fn every<F, Fut>(period: Duration, mut shutdown: watch::Receiver<bool>, mut pass: F) -> JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => pass().await,
                _ = shutdown.changed() => break,
            }
        }
    })
}

/// How long the coordinator waits after a report changed other nodes' desired state before it
/// recomputes them, so that a burst of changes (a deployment scaling up) costs one pass.
const DESIRED_STATE_DEBOUNCE: Duration = Duration::from_millis(100);

/// Starts a coordinator that tells no service manager anything (tests, `hexa-coordinator` outside
/// systemd); see [`start_notifying`].
pub async fn start(config: CoordinatorConfig) -> Result<Running, StartError> {
    start_notifying(config, ServiceManager::none()).await
}

/// The status line `systemctl status` shows while serving: where, and the nodes by health.
fn serving_status(quic_addr: SocketAddr, admin_addr: SocketAddr, inventory: &Inventory) -> String {
    let counts = inventory.health_counts();
    let total: usize = counts.values().sum();
    let by_health: Vec<String> = counts.iter().map(|(health, n)| format!("{n} {health}")).collect();
    let nodes = if by_health.is_empty() { String::new() } else { format!(" ({})", by_health.join(", ")) };
    format!("serving agents on {quic_addr}/udp, admin API on {admin_addr}; {total} nodes{nodes}")
}

/// Brings up the coordinator, telling `service` what it is doing (STATUS) and feeding its watchdog
/// from the inventory's health loop, the loop every node's health depends on: a pass stuck on the
/// inventory stops the pings. READY is the caller's to say, once [`start_notifying`] has returned:
/// by then the store is open and both listeners are bound.
pub async fn start_notifying(config: CoordinatorConfig, service: Arc<ServiceManager>) -> Result<Running, StartError> {
    config.validate().map_err(StartError::Config)?;
    service.status(&format!("opening the state in {}", config.state_dir.display()));
    fsutil::ensure_private_dir(&config.state_dir)?;
    let store = Store::open_configured(&config.store, &config.state_dir)?;
    let (ca, created_ca) = match config.store.backend {
        store::BackendKind::Redb => CertificateAuthority::load_or_create(&config.state_dir)?,
        // One CA for every coordinator of the store, kept there sealed (see `ca_seal`). Its record
        // is the one written before leading: only ever created if absent, or sealed again over the
        // very record read, so that coordinators starting together still end with one CA.
        store::BackendKind::Etcd => {
            let seal =
                ca_seal::SealKeys::load(&config.store, &config.state_dir).map_err(bootstrap::BootstrapError::from)?;
            CertificateAuthority::load_or_create_shared(&config.state_dir, &store, &seal, true)?
        }
    };
    if created_ca {
        tracing::info!(ca_hash = %ca.hash(), "certificate authority created");
    }
    let ca = Arc::new(ca);
    let listeners = bind(&config, &ca).await?;
    // Nothing is written, and nothing loaded that another coordinator may still change, before
    // this one leads.
    let leadership = lead(&config, &store, &service, &listeners).await?;
    let admin_token_sha256 = admin_token_hash(&config, &store)?;
    let metrics = Arc::new(Metrics::default());
    // A leader of several coordinators may take over nodes that reported to another until a
    // moment ago: they get `lost_after` to come over before their silence counts. A lone
    // coordinator's nodes had no one else to report to.
    let start_grace = if config.store.backend == store::BackendKind::Etcd { config.lost_after } else { Duration::ZERO };
    let thresholds =
        HealthThresholds { unreachable_after: config.unreachable_after, lost_after: config.lost_after, start_grace };
    let plans = desired::Plans {
        k3s: desired::K3sPlan {
            settings: config.k3s.clone(),
            server_secret: k3s_secret(&store, desired::K3S_SERVER_SECRET)?,
            agent_secret: k3s_secret(&store, desired::K3S_AGENT_SECRET)?,
        },
        isolation: desired::IsolationPlan::from_settings(&config.isolation, &own_addresses(&config))
            .map_err(StartError::Config)?,
    };
    let inventory = Arc::new(Inventory::load(
        store.clone(),
        ca.clone(),
        thresholds,
        config.node_cert_validity,
        metrics.clone(),
        plans,
    )?);

    let provisioner = match &config.proxmox {
        Some(settings) => Some(Arc::new(proxmox::Provisioner::new(
            settings.clone(),
            store.clone(),
            config.placement.node_classes.clone(),
            ca.hash(),
        )?)),
        None => None,
    };
    let node_provisioner: Arc<dyn tenants::NodeProvisioner> = match &provisioner {
        Some(p) => p.clone(),
        None => Arc::new(tenants::RecordOnly),
    };
    let tenants = Arc::new(
        tenants::Tenants::load(
            store.clone(),
            inventory.clone(),
            config.placement.clone(),
            desired::AllocationPlan { pids_per_pod: config.isolation.pids_per_pod },
            node_provisioner,
            config.hostcluster.mode != hostcluster::render::Mode::Off,
        )
        .map_err(StartError::Tenants)?,
    );
    let seed_listener = match &config.proxmox {
        Some(settings) => {
            let addr = settings.seed_listen;
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|error| StartError::Listen {
                what: "seed HTTP",
                addr,
                error,
            })?;
            let bound = listener.local_addr().map_err(|error| StartError::Listen { what: "seed HTTP", addr, error })?;
            Some((listener, bound))
        }
        None => None,
    };
    if let (Some(p), Some((_, bound))) = (&provisioner, &seed_listener) {
        p.attach(tenants.clone(), p.settings().seed_base(*bound));
    }

    let host_cluster = Arc::new(
        hostcluster::reconcile::HostCluster::new(
            config.hostcluster.clone(),
            config.placement.node_classes.clone(),
            tenants.clone(),
            &config.state_dir.join(hostcluster::access::STORED_KUBECONFIG),
        )
        .await?,
    );

    // With an API server, it alone says who owns which pod IP; agents' reports no longer count.
    let pod_owners_from_api = config.isolation.enabled && config.hostcluster.mode == hostcluster::render::Mode::Apply;
    if pod_owners_from_api && host_cluster.client().is_some() {
        inventory.take_pod_owners_from_api();
    }
    let access_requests = Arc::new(hostcluster::access::AccessRequests::default());

    let Listeners { endpoint, server_config, quic_addr, admin: listener, admin_addr } = listeners;

    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let link_ctx = Arc::new(link::LinkContext {
        inventory: inventory.clone(),
        metrics: metrics.clone(),
        report_interval: config.report_interval,
        silence_limit: config.unreachable_after,
        limits: config.admission,
        access: access_requests.clone(),
    });
    endpoint.set_server_config(Some(server_config));
    tasks.push(tokio::spawn(link::serve(endpoint, link_ctx, shutdown_rx.clone())));

    let admin_ctx = Arc::new(admin::AdminContext {
        inventory: inventory.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
        admin_token_sha256,
        default_token_ttl: config.token_ttl,
        tenants: tenants.clone(),
        node_classes: config.placement.node_classes.clone(),
        provisioner: provisioner.clone(),
    });
    tasks.push(tokio::spawn(http_server::serve(
        listener,
        admin::router(admin_ctx),
        http_server::HttpLimits::default(),
        shutdown_rx.clone(),
    )));

    if pod_owners_from_api {
        // From the moment there is a client: at once, or once a server node gave access.
        let (cluster, owners, mut stop) = (host_cluster.clone(), inventory.clone(), shutdown_rx.clone());
        tasks.push(tokio::spawn(async move {
            let client = tokio::select! {
                client = cluster.wait_for_client() => client,
                _ = stop.changed() => return,
            };
            owners.take_pod_owners_from_api();
            hostcluster::pod_watch::run(client, owners, stop).await;
        }));
    }

    if host_cluster.needs_access() {
        // No credentials: ask the server nodes for them, a pass per report interval until one works.
        let bootstrap = Arc::new(hostcluster::access::Bootstrap {
            requests: access_requests.clone(),
            inventory: inventory.clone(),
            stored: config.state_dir.join(hostcluster::access::STORED_KUBECONFIG),
        });
        let cluster = host_cluster.clone();
        tasks.push(every(config.report_interval, shutdown_rx.clone(), move || {
            let (bootstrap, cluster) = (bootstrap.clone(), cluster.clone());
            async move {
                if !cluster.needs_access() {
                    return;
                }
                match bootstrap.attempt().await {
                    Ok(client) => {
                        cluster.set_client(client);
                        // Tenants that waited are realised now, not a pass later.
                        cluster.reconcile().await;
                    }
                    Err(why) => cluster.set_waiting_for(&why),
                }
            }
        }));
    }

    let tick_every = (config.report_interval / 4).min(Duration::from_millis(250));
    let ticker_inventory = inventory.clone();
    let ticker_service = service.clone();
    tasks.push(every(tick_every, shutdown_rx.clone(), move || {
        ticker_inventory.tick(std::time::Instant::now());
        ticker_service.status(&serving_status(quic_addr, admin_addr, &ticker_inventory));
        ticker_service.ping();
        std::future::ready(())
    }));

    // Desired state that pod ownership made stale (pods moved, a node was lost, the API's pods
    // changed, so tenants' IP sets did) is recomputed here, once per burst, never on the report
    // path, and only for the nodes whose sets changed.
    let desired_inventory = inventory.clone();
    let mut desired_shutdown = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = desired_inventory.desired_stale() => {
                    tokio::time::sleep(DESIRED_STATE_DEBOUNCE).await;
                    if let Err(e) = desired_inventory.refresh_desired() {
                        tracing::error!(error = %e, "cannot update desired state after pod changes");
                    }
                }
                _ = desired_shutdown.changed() => break,
            }
        }
    }));

    // Realisation on the host cluster: a pass every two report intervals (tenants that fail back off).
    let realize = host_cluster.clone();
    tasks.push(every(config.report_interval * 2, shutdown_rx.clone(), move || {
        let realize = realize.clone();
        async move {
            let pass = realize.reconcile().await;
            if pass.writes > 0 || pass.failures > 0 {
                tracing::debug!(writes = pass.writes, failures = pass.failures, "host cluster pass");
            }
        }
    }));

    let mut seed_addr = None;
    if let (Some(p), Some((listener, bound))) = (&provisioner, seed_listener) {
        seed_addr = Some(bound);
        tasks.push(tokio::spawn(http_server::serve(
            Arc::new(listener),
            proxmox::seed::router(p.clone()),
            http_server::HttpLimits::default(),
            shutdown_rx.clone(),
        )));
        tasks.push(tokio::spawn(p.clone().run(config.report_interval, shutdown_rx.clone())));
    }

    // The placement control loop: one reconcile per report interval.
    let reconcile_tenants = tenants.clone();
    tasks.push(every(config.report_interval, shutdown_rx, move || {
        let tenants = reconcile_tenants.clone();
        async move {
            if let Err(e) = tenants.reconcile().await {
                tracing::error!(error = %e, "placement reconcile failed");
            }
        }
    }));

    tracing::info!(%quic_addr, %admin_addr, ca_hash = %ca.hash(), "coordinator started");
    Ok(Running {
        quic_addr,
        admin_addr,
        ca_hash: ca.hash(),
        created_ca,
        admin_token_path: config.state_dir.join(ADMIN_TOKEN_FILE),
        inventory,
        tenants,
        host_cluster,
        metrics,
        provisioner,
        seed_addr,
        leadership,
        shutdown,
        tasks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn every_runs_at_once_then_each_period_until_shutdown() {
        let passes = Arc::new(AtomicU32::new(0));
        let (stop, stopped) = watch::channel(false);
        let counted = passes.clone();
        let task = every(Duration::from_millis(20), stopped, move || {
            counted.fetch_add(1, Ordering::SeqCst);
            std::future::ready(())
        });
        // Passes keep coming (no timing is asserted: only that they repeat).
        tokio::time::timeout(Duration::from_secs(10), async {
            while passes.load(Ordering::SeqCst) < 3 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        let _ = stop.send(true);
        tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
        let ran = passes.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(passes.load(Ordering::SeqCst), ran, "no pass after shutdown");
    }
}

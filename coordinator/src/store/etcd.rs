//! The etcd backend: each table's records under `<prefix><table>/<key>`, values the records' JSON
//! bytes as in redb, a commit one etcd transaction (`Txn`) that applies every write only if each
//! record the transaction read still has the mod revision it was read at.
//!
//! # How the synchronous store drives the async client
//!
//! The store's API is synchronous (callers hold it inside transactions, from async tasks and from
//! plain threads alike), while `etcd-client` is async. The backend owns one thread running its own
//! single-threaded Tokio runtime, which owns the client; every operation is sent to it over a
//! channel with a reply channel, and the caller blocks on the reply. We chose this over
//! `tokio::task::block_in_place` because `block_in_place` panics on a current-thread runtime
//! (every `#[tokio::test]`, and any caller not on a Tokio worker) and would tie the store to the
//! caller's runtime; the thread works the same from anywhere, and etcd's progress never depends on
//! the callers' runtime having a free worker. A caller blocks for as long as redb's fsync would
//! block it, bounded by `request_timeout`: a write returns only once etcd has answered that the
//! transaction committed (etcd answers after a quorum of members has it in its log), and fails with
//! a clear error when no quorum answers in time.
//!
//! The thread keeps one client per member and sends each request to the member that answered
//! last; a member that does not answer within its share of `request_timeout` hands the request to
//! the next, so a killed or partitioned member costs a request a fraction of the timeout, once.
//! Every commit also writes a marker key of its own, so that a transaction sent again after a
//! timeout, and refused because the first attempt had in fact committed, is known for a success
//! (one small key per coordinator start, `<prefix>commits/<id>`, outside every table).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KvClient, SortOrder, SortTarget,
    TlsOptions, Txn, TxnOp,
};
use tokio::sync::mpsc;

use super::{Backend, Batch, Leadership, StoreError, StoreSettings, Table, Versioned};

/// Records per range request: a page of node records stays far below the gRPC message limit.
const PAGE: i64 = 256;
/// Largest answer the client accepts (a page of large records).
const MAX_MESSAGE: usize = 64 << 20;

#[derive(Clone)]
enum Op {
    Get(Vec<u8>),
    /// The create revision of a key, if it exists.
    Created(Vec<u8>),
    Campaign {
        name: Vec<u8>,
        value: Vec<u8>,
        ttl: i64,
    },
    Range(Vec<u8>),
    Txn(Txn),
    /// The value of the oldest key under an election's prefix: its leader's, as etcd's election
    /// API decides (the lowest create revision wins).
    Leader(Vec<u8>),
}

enum Answer {
    Get(Option<Versioned>),
    Created(Option<i64>),
    Leader { key: Vec<u8>, rev: i64, lease: i64, ended: tokio::sync::watch::Receiver<bool> },
    Range(Vec<(Vec<u8>, Vec<u8>)>),
    Txn { succeeded: bool },
}

type Reply = std_mpsc::SyncSender<Result<Answer, String>>;

#[derive(Debug)]
pub struct EtcdBackend {
    requests: mpsc::UnboundedSender<(Op, Reply)>,
    prefix: String,
    endpoints: String,
    request_timeout: Duration,
    /// `<prefix>commits/<random id of this backend>`: every commit also writes its sequence
    /// number there, so a commit whose first attempt timed out knows whether it went through.
    marker: Vec<u8>,
    sequence: AtomicU64,
    /// Once elected: the leader key and its create revision, which every commit is conditioned on.
    fence: std::sync::Mutex<Option<(Vec<u8>, i64)>>,
}

fn options(settings: &StoreSettings) -> Result<ConnectOptions, String> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(settings.dial_timeout)
        .with_timeout(settings.request_timeout)
        .with_keep_alive(Duration::from_secs(10), settings.request_timeout)
        // A member cut off from the others answers at once that it has no leader, instead of
        // holding the request until it times out.
        .with_require_leader(true);
    let read = |key: &str, path: &str| std::fs::read(path).map_err(|e| format!("{key} {path:?}: {e}"));
    if !settings.ca_file.is_empty() || !settings.cert_file.is_empty() {
        let mut tls = TlsOptions::new();
        if !settings.ca_file.is_empty() {
            tls = tls.ca_certificate(Certificate::from_pem(read("store.ca_file", &settings.ca_file)?));
        }
        if !settings.cert_file.is_empty() {
            let cert = read("store.cert_file", &settings.cert_file)?;
            let key = read("store.key_file", &settings.key_file)?;
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        options = options.with_tls(tls);
    }
    Ok(options)
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

async fn run(mut kv: KvClient, op: Op) -> Result<Answer, etcd_client::Error> {
    match op {
        Op::Get(key) => {
            let response = kv.get(key, None).await?;
            let found =
                response.kvs().first().map(|kv| Versioned { value: kv.value().to_vec(), version: kv.mod_revision() });
            Ok(Answer::Get(found))
        }
        Op::Range(prefix) => {
            // Pages of one revision: the whole table as it was at the first page.
            let end = prefix_end(&prefix);
            let mut start = prefix;
            let mut revision = 0;
            let mut out = Vec::new();
            loop {
                let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
                if revision != 0 {
                    options = options.with_revision(revision);
                }
                let response = kv.get(start.clone(), Some(options)).await?;
                if revision == 0 {
                    revision = response.header().map_or(0, |h| h.revision());
                }
                for kv in response.kvs() {
                    out.push((kv.key().to_vec(), kv.value().to_vec()));
                }
                match out.last() {
                    Some((last, _)) if response.more() => {
                        start = last.clone();
                        start.push(0);
                    }
                    _ => return Ok(Answer::Range(out)),
                }
            }
        }
        Op::Txn(txn) => Ok(Answer::Txn { succeeded: kv.txn(txn).await?.succeeded() }),
        Op::Leader(prefix) => {
            let options =
                GetOptions::new().with_prefix().with_sort(SortTarget::Create, SortOrder::Ascend).with_limit(1);
            let response = kv.get(prefix, Some(options)).await?;
            let found = response
                .kvs()
                .first()
                .map(|kv| Versioned { value: kv.value().to_vec(), version: kv.create_revision() });
            Ok(Answer::Get(found))
        }
        Op::Created(key) => {
            let response = kv.get(key, None).await?;
            Ok(Answer::Created(response.kvs().first().map(|kv| kv.create_revision())))
        }
        // Campaigns go to a whole client (Members::campaign), never here.
        Op::Campaign { .. } => Err(etcd_client::Error::InvalidArgs("a campaign needs the election API".into())),
    }
}

/// One client per member, and the member that answered last. A member that fails (killed,
/// partitioned, without a leader) hands the request to the next one, reads and transactions alike:
/// a transaction that timed out may have committed, and [`EtcdBackend::commit`] tells a second
/// attempt's refusal after such a first one from a real conflict by its commit marker.
struct Members {
    urls: Vec<String>,
    clients: Vec<KvClient>,
    /// The same members' whole clients, for leases and elections.
    full: Vec<Client>,
    preferred: AtomicUsize,
}

/// gRPC codes of a member that could not answer (as opposed to one that refused the request):
/// cancelled, unknown, deadline exceeded, aborted, unavailable.
fn transient(code: i32) -> bool {
    matches!(code, 1 | 2 | 4 | 10 | 14)
}

/// Keeps `lease` alive, a keep-alive every third of `ttl`, on member `member` of `clients` and,
/// when that one does not confirm in time, on the next. Ends `ended` when etcd says the lease is
/// gone (revoked, or expired while this process was stopped) or no member has confirmed it for a
/// whole TTL (then it may have expired): from then on the leader key's revision no longer
/// matches, and whoever waits on `ended` learns that this process no longer leads.
async fn keep_lease(
    clients: Vec<Client>,
    mut member: usize,
    lease: i64,
    ttl: Duration,
    ended: tokio::sync::watch::Sender<bool>,
) {
    let every = ttl / 3;
    let mut confirmed = tokio::time::Instant::now();
    let mut stream = None;
    loop {
        let left = ttl.saturating_sub(confirmed.elapsed());
        if left.is_zero() {
            break;
        }
        let attempt = tokio::time::timeout(left.min(every.max(Duration::from_millis(500))), async {
            if stream.is_none() {
                stream = Some(clients[member].clone().lease_keep_alive(lease).await.ok()?);
            }
            let (keeper, answers) = stream.as_mut()?;
            keeper.keep_alive().await.ok()?;
            answers.message().await.ok()?
        })
        .await;
        match attempt {
            Ok(Some(answer)) if answer.ttl() > 0 => {
                confirmed = tokio::time::Instant::now();
                tokio::time::sleep(every).await;
            }
            // etcd's own word: the lease is gone.
            Ok(Some(_)) => break,
            // No answer from this member: the next one is asked.
            _ => {
                stream = None;
                member = (member + 1) % clients.len();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    ended.send_replace(true);
}

impl Members {
    /// Grants a lease of `ttl` seconds, keeps it alive from this thread for as long as etcd takes
    /// the keep-alives, and campaigns under `name` with it until elected. Both go to the member
    /// that answered last and move on to the next one that does not answer: one member lost
    /// (killed, cut off) costs neither the lease nor the campaign.
    async fn campaign(&self, name: Vec<u8>, value: Vec<u8>, ttl: i64) -> Result<Answer, String> {
        let count = self.full.len();
        let mut member = self.preferred.load(Ordering::Relaxed) % count;
        let mut failures = Vec::new();
        let lease = loop {
            match self.full[member].clone().lease_grant(ttl, None).await {
                Ok(granted) => break granted.id(),
                Err(e) if failures.len() + 1 < count => {
                    failures.push(format!("{}: {e}", self.urls[member]));
                    member = (member + 1) % count;
                }
                Err(e) => {
                    failures.push(format!("{}: {e}", self.urls[member]));
                    return Err(format!("no member granted a lease ({})", failures.join("; ")));
                }
            }
        };
        let ttl_duration = Duration::from_secs(u64::try_from(ttl.max(1)).unwrap_or(1));
        let (ended_tx, ended) = tokio::sync::watch::channel(false);
        tokio::spawn(keep_lease(self.full.clone(), member, lease, ttl_duration, ended_tx));
        // The campaign answers only once this process leads, which may take longer than a
        // request may (the client's request timeout cuts it off): asked again with the same
        // lease, etcd goes on waiting with the key it already made, for as long as the lease lives.
        let response = loop {
            match self.full[member].clone().campaign(name.clone(), value.clone(), lease).await {
                Ok(response) => break response,
                Err(e) if *ended.borrow() => {
                    return Err(format!("the lease ended while waiting to lead ({e}); start again"));
                }
                // Cut off, or the member is down (a member's answer that is not about time or
                // reachability is final): the next member is asked.
                Err(etcd_client::Error::GRpcStatus(status)) if transient(status.code() as i32) => {
                    member = (member + 1) % count;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(etcd_client::Error::TransportError(_)) => {
                    member = (member + 1) % count;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.to_string()),
            }
        };
        let leader = response.leader().ok_or_else(|| "etcd answered the campaign without a leader key".to_string())?;
        Ok(Answer::Leader { key: leader.key().to_vec(), rev: leader.rev(), lease, ended })
    }

    /// Sends `op` to the preferred member, then to the next one that does not answer, round after
    /// round until `timeout`: members without a leader answer at once, and an election (the etcd
    /// leader killed) takes a second or two, which a request waits out instead of failing.
    async fn run(&self, op: Op, timeout: Duration) -> Result<Answer, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let count = self.clients.len();
        let mut failures = Vec::new();
        loop {
            failures.clear();
            let first = self.preferred.load(Ordering::Relaxed);
            for attempt in 0..count {
                let member = (first + attempt) % count;
                // What is left of the request's time, shared among the members still to try.
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let this_try = left / u32::try_from(count - attempt).unwrap_or(1);
                match tokio::time::timeout(this_try, run(self.clients[member].clone(), op.clone())).await {
                    Ok(Ok(answer)) => {
                        self.preferred.store(member, Ordering::Relaxed);
                        return Ok(answer);
                    }
                    // etcd's own refusal (too many operations, a request too large, no
                    // permission): every member would say the same.
                    Ok(Err(etcd_client::Error::GRpcStatus(status))) if !transient(status.code() as i32) => {
                        return Err(explain(&format!("{}: {}", self.urls[member], status.message())));
                    }
                    Ok(Err(etcd_client::Error::GRpcStatus(status))) => {
                        failures.push(format!("{}: {}", self.urls[member], status.message()))
                    }
                    Ok(Err(e)) => failures.push(format!("{}: {e}", self.urls[member])),
                    Err(_) => failures.push(format!(
                        "{}: no answer within {}",
                        self.urls[member],
                        humantime::format_duration(Duration::from_millis(this_try.as_millis() as u64))
                    )),
                }
                self.preferred.store((member + 1) % count, Ordering::Relaxed);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left < ROUND_PAUSE * 2 {
                break;
            }
            tokio::time::sleep(ROUND_PAUSE).await;
        }
        Err(format!(
            "no member answered within {} ({}): is a quorum of the etcd members up and reachable? (a write \
             that got no answer may still be applied once they are)",
            humantime::format_duration(timeout),
            failures.join("; ")
        ))
    }
}

/// The pause between two rounds of a request over every member.
const ROUND_PAUSE: Duration = Duration::from_millis(100);

impl EtcdBackend {
    /// Starts the client thread and waits (at most `dial_timeout`) until etcd answers a read.
    pub fn connect(settings: &StoreSettings) -> Result<EtcdBackend, StoreError> {
        let endpoints = settings.endpoints.join(",");
        let fail = |message: String| StoreError::Etcd { endpoints: endpoints.clone(), message };
        let options = options(settings).map_err(fail)?;
        let (requests, mut incoming) = mpsc::unbounded_channel::<(Op, Reply)>();
        let (ready_tx, ready_rx) = std_mpsc::sync_channel::<Result<(), String>>(1);
        let urls = settings.endpoints.clone();
        let timeout = settings.request_timeout;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| fail(format!("cannot start the etcd client's runtime: {e}")))?;
        std::thread::Builder::new()
            .name("hexa-store-etcd".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let mut clients = Vec::new();
                    let mut full = Vec::new();
                    for url in &urls {
                        match Client::connect([url], Some(options.clone())).await {
                            Ok(client) => {
                                clients.push(client.kv_client().max_decoding_message_size(MAX_MESSAGE));
                                full.push(client);
                            }
                            Err(e) => {
                                let _ = ready_tx.send(Err(format!("{url}: {e}")));
                                return;
                            }
                        }
                    }
                    let _ = ready_tx.send(Ok(()));
                    let members = std::sync::Arc::new(Members { urls, clients, full, preferred: AtomicUsize::new(0) });
                    // Ends when the backend, the only sender, is dropped.
                    while let Some((op, reply)) = incoming.recv().await {
                        let members = members.clone();
                        tokio::spawn(async move {
                            let answer = match op {
                                Op::Campaign { name, value, ttl } => members.campaign(name, value, ttl).await,
                                op => members.run(op, timeout).await,
                            };
                            let _ = reply.send(answer);
                        });
                    }
                })
            })
            .map_err(|e| fail(format!("cannot start the etcd client's thread: {e}")))?;
        match ready_rx.recv_timeout(settings.dial_timeout) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(fail(e)),
            Err(_) => {
                return Err(fail(format!(
                    "no connection within {}",
                    humantime::format_duration(settings.dial_timeout)
                )));
            }
        }
        let backend = EtcdBackend {
            requests,
            prefix: settings.prefix.clone(),
            endpoints: endpoints.clone(),
            request_timeout: settings.dial_timeout,
            marker: format!("{}commits/{:016x}", settings.prefix, rand::random::<u64>()).into_bytes(),
            sequence: AtomicU64::new(1),
            fence: std::sync::Mutex::new(None),
        };
        // The first answer proves a quorum is there; until then a start waits up to dial_timeout.
        backend.get(Table::Meta, "schema_version").map_err(|e| match e {
            StoreError::Etcd { message, .. } => fail(format!(
                "cannot read from etcd at start ({message}): check store.endpoints, and that a quorum of the \
                 members is up"
            )),
            other => other,
        })?;
        Ok(EtcdBackend { request_timeout: settings.request_timeout, ..backend })
    }

    fn key(&self, table: Table, key: &str) -> Vec<u8> {
        format!("{}{}/{key}", self.prefix, table.name()).into_bytes()
    }

    fn ask(&self, op: Op) -> Result<Answer, StoreError> {
        let fail = |message: String| StoreError::Etcd { endpoints: self.endpoints.clone(), message };
        let (reply, answer) = std_mpsc::sync_channel(1);
        self.requests.send((op, reply)).map_err(|_| fail("the etcd client thread has stopped".into()))?;
        // The client's own timeout (request_timeout) ends the request first; this bound only
        // covers the trip through the channel, so that a caller never waits unbounded.
        match answer.recv_timeout(self.request_timeout + Duration::from_secs(1)) {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(message)) => Err(fail(explain(&message))),
            Err(_) => Err(fail(format!(
                "no answer within {}: is a quorum of the etcd members up and reachable?",
                humantime::format_duration(self.request_timeout)
            ))),
        }
    }
}

/// The client's error, with what an operator can do about the usual ones.
fn explain(message: &str) -> String {
    let lower = message.to_ascii_lowercase();
    if lower.contains("too many operations") {
        format!(
            "{message}: this transaction writes more records than etcd's --max-txn-ops allows; raise it (e.g. 1024)"
        )
    } else if lower.contains("request too large") {
        format!("{message}: raise etcd's --max-request-bytes (e.g. 10485760)")
    } else {
        message.to_string()
    }
}

impl Backend for EtcdBackend {
    fn get(&self, table: Table, key: &str) -> Result<Option<Versioned>, StoreError> {
        match self.ask(Op::Get(self.key(table, key)))? {
            Answer::Get(found) => Ok(found),
            _ => Err(StoreError::Db("etcd answered a read with something else".into())),
        }
    }

    fn range(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = self.key(table, "");
        let Answer::Range(records) = self.ask(Op::Range(prefix.clone()))? else {
            return Err(StoreError::Db("etcd answered a range with something else".into()));
        };
        records
            .into_iter()
            .map(|(key, value)| {
                let key = String::from_utf8(key[prefix.len()..].to_vec()).map_err(|e| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&prefix).into_owned(),
                    message: e.to_string(),
                })?;
                Ok((key, value))
            })
            .collect()
    }

    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let mut compares: Vec<Compare> = batch
            .read
            .iter()
            .map(|((table, key), version)| Compare::mod_revision(self.key(*table, key), CompareOp::Equal, *version))
            .collect();
        let fence = self.fence.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        if let Some((key, rev)) = &fence {
            compares.push(Compare::create_revision(key.clone(), CompareOp::Equal, *rev));
        }
        let mut ops: Vec<TxnOp> = batch
            .writes
            .into_iter()
            .map(|((table, key), value)| match value {
                Some(value) => TxnOp::put(self.key(table, &key), value, None),
                None => TxnOp::delete(self.key(table, &key), None),
            })
            .collect();
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed).to_string();
        ops.push(TxnOp::put(self.marker.clone(), sequence.clone(), None));
        match self.ask(Op::Txn(Txn::new().when(compares).and_then(ops)))? {
            Answer::Txn { succeeded: true } => Ok(()),
            Answer::Txn { succeeded: false } => {
                // Refused: by another writer, or because an attempt that timed out had committed
                // it already (its writes changed what the compares look at). The marker says which.
                if let Answer::Get(Some(found)) = self.ask(Op::Get(self.marker.clone()))?
                    && found.value == sequence.as_bytes()
                {
                    return Ok(());
                }
                if let Some((key, rev)) = fence
                    && !matches!(self.ask(Op::Created(key))?, Answer::Created(Some(now)) if now == rev)
                {
                    return Err(StoreError::NotLeader { endpoints: self.endpoints.clone() });
                }
                Err(StoreError::Conflict { endpoints: self.endpoints.clone() })
            }
            _ => Err(StoreError::Db("etcd answered a transaction with something else".into())),
        }
    }

    fn campaign(&self, who: &str, ttl: Duration) -> Result<Leadership, StoreError> {
        let name = format!("{}leader", self.prefix).into_bytes();
        let ttl = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let (reply, answer) = std_mpsc::sync_channel(1);
        let fail = |message: String| StoreError::Etcd { endpoints: self.endpoints.clone(), message };
        self.requests
            .send((Op::Campaign { name, value: who.as_bytes().to_vec(), ttl }, reply))
            .map_err(|_| fail("the etcd client thread has stopped".into()))?;
        // Waits for as long as another coordinator leads.
        match answer.recv() {
            Ok(Ok(Answer::Leader { key, rev, lease, ended })) => {
                *self.fence.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some((key.clone(), rev));
                Ok(Leadership {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    revision: rev,
                    lease,
                    ended: Some(ended),
                })
            }
            Ok(Ok(_)) => Err(fail("etcd answered a campaign with something else".into())),
            Ok(Err(message)) => Err(fail(format!("campaign for leadership: {message}"))),
            Err(_) => Err(fail("the etcd client thread has stopped".into())),
        }
    }

    fn leader(&self) -> Result<Option<String>, StoreError> {
        // The election's keys are `<name>/<lease id>`.
        let prefix = format!("{}leader/", self.prefix).into_bytes();
        match self.ask(Op::Leader(prefix))? {
            Answer::Get(found) => Ok(found.map(|kv| String::from_utf8_lossy(&kv.value).into_owned())),
            _ => Err(StoreError::Db("etcd answered a leader lookup with something else".into())),
        }
    }

    fn location(&self) -> String {
        format!("etcd {} under {}", self.endpoints, self.prefix)
    }
}

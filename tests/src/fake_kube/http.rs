//! HTTP plumbing (a listener that can be closed, connections that can be cut), requests and
//! replies, routing, and the patch formats.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State as AxState;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::apply::{meta_str, set_meta};
use super::errors::ApiError;
use super::store::{FieldValidation, State};
use super::types::ResourceDef;
use super::validation::json_type_name;
use super::watch::{WatchSpec, watch_stream};
use super::{lock, spawn_timers};

pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    /// Woken after every change, for watches.
    pub(super) notify: Notify,
    pub(super) down: AtomicBool,
    /// A second handle on every open connection's socket, to shut it down from outside.
    pub(super) conns: Mutex<HashMap<u64, std::net::TcpStream>>,
    pub(super) next_conn: AtomicU64,
}

impl Shared {
    pub(super) fn new(port: u16) -> Shared {
        Shared {
            state: Mutex::new(State::new(port)),
            notify: Notify::new(),
            down: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub(super) fn close_connections(&self) {
        for (_, socket) in lock(&self.conns).drain() {
            let _ = socket.shutdown(Shutdown::Both);
        }
        self.notify.notify_waiters();
    }
}

pub(super) fn bind(port: u16) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
    socket.listen(1024)
}

pub(super) fn spawn_server(runtime: &Handle, shared: Arc<Shared>, listener: TcpListener) -> JoinHandle<()> {
    let app = Router::new().fallback(handle).with_state(shared.clone());
    runtime.spawn(async move {
        let _ = axum::serve(TrackedListener { inner: listener, shared }, app).await;
    })
}

pub(super) struct TrackedListener {
    pub(super) inner: TcpListener,
    pub(super) shared: Arc<Shared>,
}

impl axum::serve::Listener for TrackedListener {
    type Io = TrackedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    if self.shared.down.load(Ordering::SeqCst) {
                        continue; // dropped: the peer sees the connection closed
                    }
                    if let Ok(io) = TrackedStream::new(stream, self.shared.clone()) {
                        return (io, addr);
                    }
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

pub(super) struct TrackedStream {
    pub(super) inner: TcpStream,
    pub(super) id: u64,
    pub(super) shared: Arc<Shared>,
}

impl TrackedStream {
    pub(super) fn new(stream: TcpStream, shared: Arc<Shared>) -> io::Result<TrackedStream> {
        let std_stream = stream.into_std()?;
        let handle = std_stream.try_clone()?;
        let inner = TcpStream::from_std(std_stream)?;
        let id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
        lock(&shared.conns).insert(id, handle);
        Ok(TrackedStream { inner, id, shared })
    }
}

impl Drop for TrackedStream {
    fn drop(&mut self) {
        lock(&self.shared.conns).remove(&self.id);
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

async fn handle(
    AxState(shared): AxState<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let latency = shared.lock().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let req = Req::new(method, &uri, &headers, body);
    let (reply, warnings, timers) = {
        let mut st = shared.lock();
        let reply = st.serve(&req);
        (reply, std::mem::take(&mut st.warnings), std::mem::take(&mut st.timers))
    };
    spawn_timers(&Handle::current(), &shared, timers);
    shared.notify.notify_waiters();
    let mut response = match reply {
        Reply::Json { code, body, content_type } => {
            let bytes = serde_json::to_vec(&body).unwrap_or_default();
            build_response(code, content_type.unwrap_or("application/json"), Body::from(bytes))
        }
        Reply::Plain(code, text) => build_response(code, "text/plain; charset=utf-8", Body::from(text)),
        Reply::Watch(spec) => {
            build_response(200, "application/json", Body::from_stream(watch_stream(shared.clone(), *spec)))
        }
    };
    for warning in warnings {
        let text = format!("299 - {}", serde_json::to_string(&warning).unwrap_or_default());
        if let Ok(value) = HeaderValue::from_str(&text) {
            response.headers_mut().append(header::WARNING, value);
        }
    }
    response
}

pub(super) fn build_response(code: u16, content_type: &str, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(value) = HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, private"));
    response
}

/// A parsed request.
pub(super) struct Req {
    pub(super) method: Method,
    pub(super) path: String,
    pub(super) query_string: String,
    pub(super) query: HashMap<String, String>,
    pub(super) content_type: String,
    pub(super) accept: String,
    pub(super) user_agent: String,
    /// The token of `Authorization: Bearer <token>`, if the request carries one.
    pub(super) bearer: Option<String>,
    pub(super) body: Bytes,
}

impl Req {
    pub(super) fn new(method: Method, uri: &Uri, headers: &HeaderMap, body: Bytes) -> Req {
        let text = |name: header::HeaderName| {
            headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string).unwrap_or_default()
        };
        let query_string = uri.query().unwrap_or("").to_string();
        let mut query = HashMap::new();
        for pair in query_string.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            query.insert(percent_decode(k), percent_decode(v));
        }
        Req {
            method,
            path: uri.path().to_string(),
            query_string,
            query,
            content_type: text(header::CONTENT_TYPE),
            accept: text(header::ACCEPT),
            user_agent: text(header::USER_AGENT),
            bearer: text(header::AUTHORIZATION)
                .split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim().to_string()),
            body,
        }
    }

    pub(super) fn q(&self, key: &str) -> Option<&str> {
        self.query.get(key).map(String::as_str).filter(|v| !v.is_empty())
    }

    pub(super) fn flag(&self, key: &str) -> bool {
        matches!(self.q(key), Some("true" | "1"))
    }

    pub(super) fn dry_run(&self) -> bool {
        self.q("dryRun") == Some("All")
    }

    /// The field manager: the `fieldManager` parameter, else the user agent up to its first '/'
    /// (what the API server does for non-apply requests).
    pub(super) fn manager(&self) -> String {
        if let Some(m) = self.q("fieldManager") {
            return m.to_string();
        }
        self.user_agent.split('/').next().unwrap_or("").chars().take(128).collect()
    }

    pub(super) fn media_type(&self) -> String {
        self.content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
    }
}

pub(super) enum Reply {
    Json { code: u16, body: Value, content_type: Option<&'static str> },
    Plain(u16, String),
    Watch(Box<WatchSpec>),
}

impl Reply {
    pub(super) fn ok(code: u16, body: Value) -> Reply {
        Reply::Json { code, body, content_type: None }
    }

    pub(super) fn code(&self) -> u16 {
        match self {
            Reply::Json { code, .. } | Reply::Plain(code, _) => *code,
            Reply::Watch(_) => 200,
        }
    }
}

impl From<ApiError> for Reply {
    fn from(e: ApiError) -> Reply {
        if e.plain {
            return Reply::Plain(e.code, format!("{}\n", e.message));
        }
        Reply::ok(e.code, e.status_body())
    }
}

pub(super) struct ResourcePath {
    pub(super) group: String,
    pub(super) version: String,
    pub(super) plural: String,
    pub(super) namespace: Option<String>,
    pub(super) name: Option<String>,
    pub(super) sub: Option<String>,
}

pub(super) enum Route {
    Version,
    CoreVersions,
    Groups,
    Group(String),
    GroupVersion(String, String),
    Resource(ResourcePath),
    Unknown,
}

pub(super) fn parse_route(path: &str) -> Route {
    let segments: Vec<String> = path.split('/').filter(|s| !s.is_empty()).map(percent_decode).collect();
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    match s.as_slice() {
        ["version"] => Route::Version,
        ["api"] => Route::CoreVersions,
        ["api", v] => Route::GroupVersion(String::new(), v.to_string()),
        ["api", v, rest @ ..] => resource_route("", v, rest),
        ["apis"] => Route::Groups,
        ["apis", g] => Route::Group(g.to_string()),
        ["apis", g, v] => Route::GroupVersion(g.to_string(), v.to_string()),
        ["apis", g, v, rest @ ..] => resource_route(g, v, rest),
        _ => Route::Unknown,
    }
}

pub(super) fn resource_route(group: &str, version: &str, rest: &[&str]) -> Route {
    let (plural, namespace, name, sub) = match rest {
        [p] => (*p, None, None, None),
        [p, n] => (*p, None, Some(*n), None),
        ["namespaces", ns, p] if *p != "status" && *p != "finalize" => (*p, Some(*ns), None, None),
        [p, n, s] => (*p, None, Some(*n), Some(*s)),
        ["namespaces", ns, p, n] => (*p, Some(*ns), Some(*n), None),
        ["namespaces", ns, p, n, s] => (*p, Some(*ns), Some(*n), Some(*s)),
        _ => return Route::Unknown,
    };
    Route::Resource(ResourcePath {
        group: group.to_string(),
        version: version.to_string(),
        plural: plural.to_string(),
        namespace: namespace.map(str::to_string),
        name: name.map(str::to_string),
        sub: sub.map(str::to_string),
    })
}

pub(super) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(super) fn parse_object(req: &Req) -> Result<Value, ApiError> {
    let value: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(_) if req.media_type().contains("yaml") => serde_norway::from_str(&String::from_utf8_lossy(&req.body))
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?,
        Err(e) => return Err(ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))),
    };
    if !value.is_object() {
        return Err(ApiError::bad_request(format!(
            "json: cannot unmarshal {} into Go value of type struct",
            json_type_name(&value)
        )));
    }
    Ok(value)
}

/// apiVersion and kind must be the resource's (they are filled in when missing, except for apply).
pub(super) fn check_type_meta(def: &ResourceDef, obj: &mut Value, required: bool) -> Result<(), ApiError> {
    let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("").to_string();
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("").to_string();
    if required && (api_version.is_empty() || kind.is_empty()) {
        return Err(ApiError::bad_request(format!("invalid object type: {api_version}, Kind={kind}")));
    }
    if !api_version.is_empty() && api_version != def.api_version() {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) does not match the expected API version ({})",
            def.api_version()
        )));
    }
    if !kind.is_empty() && kind != def.kind {
        return Err(ApiError::bad_request(format!(
            "the object provided is unrecognized (must be of type {}): kind {kind} does not match",
            def.kind
        )));
    }
    obj["apiVersion"] = json!(def.api_version());
    obj["kind"] = json!(def.kind);
    Ok(())
}

pub(super) fn check_name_matches(obj: &mut Value, name: &str) -> Result<(), ApiError> {
    match meta_str(obj, "name") {
        Some(n) if n != name => Err(ApiError::bad_request(format!(
            "the name of the object ({n}) does not match the name on the URL ({name})"
        ))),
        _ => {
            set_meta(obj, "name", json!(name));
            Ok(())
        }
    }
}

pub(super) fn check_namespace_matches(def: &ResourceDef, obj: &mut Value, namespace: &str) -> Result<(), ApiError> {
    if !def.namespaced {
        return Ok(());
    }
    match meta_str(obj, "namespace") {
        Some(ns) if ns != namespace => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        _ => {
            set_meta(obj, "namespace", json!(namespace));
            Ok(())
        }
    }
}

pub(super) fn field_validation(req: &Req) -> Result<FieldValidation, ApiError> {
    match req.q("fieldValidation") {
        None | Some("Warn") => Ok(FieldValidation::Warn),
        Some("Strict") => Ok(FieldValidation::Strict),
        Some("Ignore") => Ok(FieldValidation::Ignore),
        Some(other) => Err(ApiError::bad_request(format!(
            "fieldValidation: Unsupported value: {other:?}: supported values: \"Ignore\", \"Strict\", \"Warn\""
        ))),
    }
}

/// RFC 7386.
pub(super) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(target_map) = target {
        for (k, v) in patch_map {
            if v.is_null() {
                target_map.remove(k);
            } else {
                merge_patch(target_map.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

pub(super) fn escape_pointer(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

pub(super) fn unescape_pointer(pointer: &str) -> Result<Vec<String>, String> {
    if pointer.is_empty() {
        return Ok(Vec::new());
    }
    let rest = pointer.strip_prefix('/').ok_or_else(|| format!("invalid JSON pointer {pointer:?}"))?;
    Ok(rest.split('/').map(|s| s.replace("~1", "/").replace("~0", "~")).collect())
}

/// RFC 6902.
pub(super) fn apply_json_patch(doc: &mut Value, patch: &Value) -> Result<(), String> {
    let ops = patch.as_array().ok_or("a JSON patch must be an array of operations")?;
    for op in ops {
        let name = op.get("op").and_then(Value::as_str).ok_or("an operation has no \"op\"")?;
        let path = unescape_pointer(op.get("path").and_then(Value::as_str).ok_or("an operation has no \"path\"")?)?;
        let value = || op.get("value").cloned().ok_or_else(|| format!("{name}: no \"value\""));
        let from = || -> Result<Vec<String>, String> {
            unescape_pointer(op.get("from").and_then(Value::as_str).ok_or_else(|| format!("{name}: no \"from\""))?)
        };
        match name {
            "add" => json_add(doc, &path, value()?)?,
            "remove" => {
                json_remove(doc, &path)?;
            }
            "replace" => {
                json_remove(doc, &path)?;
                json_add(doc, &path, value()?)?;
            }
            "move" => {
                let v = json_remove(doc, &from()?)?;
                json_add(doc, &path, v)?;
            }
            "copy" => {
                let v = json_get(doc, &from()?).cloned().ok_or("copy: \"from\" does not exist")?;
                json_add(doc, &path, v)?;
            }
            "test" => {
                if json_get(doc, &path) != Some(&value()?) {
                    return Err(format!("testing value {} failed", op["path"]));
                }
            }
            other => return Err(format!("unknown operation {other:?}")),
        }
    }
    Ok(())
}

pub(super) fn json_get<'a>(doc: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(doc, |node, k| match node {
        Value::Object(m) => m.get(k),
        Value::Array(a) => k.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

pub(super) fn json_add(doc: &mut Value, path: &[String], value: Value) -> Result<(), String> {
    let Some((last, parent_path)) = path.split_last() else {
        *doc = value;
        return Ok(());
    };
    let parent = parent_path
        .iter()
        .try_fold(doc, |node, k| match node {
            Value::Object(m) => m.get_mut(k),
            Value::Array(a) => k.parse::<usize>().ok().and_then(move |i| a.get_mut(i)),
            _ => None,
        })
        .ok_or_else(|| format!("add operation does not apply: doc is missing path: /{}", path.join("/")))?;
    match parent {
        Value::Object(m) => {
            m.insert(last.clone(), value);
        }
        Value::Array(a) => {
            let index = if last == "-" { a.len() } else { last.parse::<usize>().map_err(|e| e.to_string())? };
            if index > a.len() {
                return Err(format!("add operation does not apply: index {index} out of range"));
            }
            a.insert(index, value);
        }
        _ => return Err("add operation does not apply: parent is not a container".into()),
    }
    Ok(())
}

pub(super) fn json_remove(doc: &mut Value, path: &[String]) -> Result<Value, String> {
    let (last, parent_path) = path.split_last().ok_or("cannot remove the whole document")?;
    let missing = || format!("remove operation does not apply: doc is missing path: /{}", path.join("/"));
    let parent = parent_path
        .iter()
        .try_fold(doc, |node, k| match node {
            Value::Object(m) => m.get_mut(k),
            Value::Array(a) => k.parse::<usize>().ok().and_then(move |i| a.get_mut(i)),
            _ => None,
        })
        .ok_or_else(missing)?;
    match parent {
        Value::Object(m) => m.remove(last).ok_or_else(missing),
        Value::Array(a) => {
            let index = last.parse::<usize>().map_err(|e| e.to_string())?;
            if index < a.len() { Ok(a.remove(index)) } else { Err(missing()) }
        }
        _ => Err(missing()),
    }
}

/// Now, as RFC 3339 in UTC with seconds (what `metav1.Time` serializes to).
pub(super) fn now_rfc3339() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

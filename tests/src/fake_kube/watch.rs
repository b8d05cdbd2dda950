//! Watches: event lines, resuming from a resourceVersion, expiry.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use serde_json::{Value, json};

use super::errors::ApiError;
use super::http::{Reply, Req, Shared};
use super::selectors::Selector;
use super::store::{Key, State};
use super::types::ResourceDef;

pub(super) struct WatchSpec {
    pub(super) group: String,
    pub(super) plural: String,
    pub(super) namespace: Option<String>,
    pub(super) selector: Selector,
    pub(super) after_rv: u64,
    pub(super) initial: String,
    pub(super) expired: Option<String>,
    pub(super) deadline: Instant,
    pub(super) done: bool,
}

pub(super) fn event_line(etype: &str, obj: &Value) -> String {
    let mut line = serde_json::to_string(&json!({"type": etype, "object": obj})).unwrap_or_default();
    line.push('\n');
    line
}

pub(super) fn expired_line(rv: u64, floor: u64) -> String {
    let status = ApiError::new(410, "Expired", format!("too old resource version: {rv} ({floor})")).status_body();
    event_line("ERROR", &status)
}

impl State {
    pub(super) fn op_watch(&self, def: &ResourceDef, namespace: Option<&str>, req: &Req) -> Result<Reply, ApiError> {
        let selector = Selector::parse(req)?;
        let timeout = req.q("timeoutSeconds").and_then(|t| t.parse::<u64>().ok()).unwrap_or(1800);
        let requested = match req.q("resourceVersion") {
            None => 0,
            Some(rv) => rv.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("invalid resourceVersion: {rv:?} is not a valid resource version"))
            })?,
        };
        let send_initial = req.flag("sendInitialEvents");
        let mut spec = WatchSpec {
            group: def.group.clone(),
            plural: def.plural.clone(),
            namespace: namespace.map(str::to_string),
            selector,
            after_rv: requested,
            initial: String::new(),
            expired: None,
            deadline: Instant::now() + Duration::from_secs(timeout),
            done: false,
        };
        if requested == 0 || send_initial {
            // "Start at most recent": the current state as ADDED events, then what follows.
            for (key, stored) in &self.objects {
                if spec.wants(key, &stored.obj) {
                    spec.initial.push_str(&event_line("ADDED", &stored.obj));
                }
            }
            spec.after_rv = self.rv;
            if send_initial {
                let bookmark = json!({
                    "kind": def.kind, "apiVersion": def.api_version(),
                    "metadata": {"resourceVersion": self.rv.to_string(),
                        "annotations": {"k8s.io/initial-events-end": "true"}},
                });
                spec.initial.push_str(&event_line("BOOKMARK", &bookmark));
            }
        } else if requested < self.events_floor {
            spec.expired = Some(expired_line(requested, self.events_floor));
        }
        Ok(Reply::Watch(Box::new(spec)))
    }
}

impl WatchSpec {
    pub(super) fn wants(&self, key: &Key, obj: &Value) -> bool {
        key.group == self.group
            && key.plural == self.plural
            && self.namespace.as_ref().is_none_or(|ns| *ns == key.namespace)
            && self.selector.matches(obj)
    }
}

pub(super) fn watch_stream(
    shared: Arc<Shared>,
    spec: WatchSpec,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    futures_util::stream::unfold((shared, spec), |(shared, mut spec)| async move {
        if spec.done {
            return None;
        }
        if !spec.initial.is_empty() {
            let text = std::mem::take(&mut spec.initial);
            return Some((Ok(Bytes::from(text)), (shared, spec)));
        }
        if let Some(line) = spec.expired.take() {
            spec.done = true;
            return Some((Ok(Bytes::from(line)), (shared, spec)));
        }
        loop {
            if shared.down.load(Ordering::SeqCst) {
                return None;
            }
            let wake = shared.clone();
            let notified = wake.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let text = {
                let st = shared.lock();
                if spec.after_rv < st.events_floor {
                    spec.done = true;
                    expired_line(spec.after_rv, st.events_floor)
                } else {
                    let start = st.events.partition_point(|e| e.rv <= spec.after_rv);
                    let mut text = String::new();
                    for event in st.events.range(start..) {
                        if spec.wants(&event.key, &event.obj) {
                            text.push_str(&event_line(event.etype, &event.obj));
                        }
                    }
                    spec.after_rv = st.rv;
                    text
                }
            };
            if !text.is_empty() {
                return Some((Ok(Bytes::from(text)), (shared, spec)));
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(spec.deadline.into()) => return None,
            }
        }
    })
}

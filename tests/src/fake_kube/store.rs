//! The objects, their keys and events, and the verbs that read and write them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::Method;
use serde_json::{Value, json};

use super::apply::{
    bump_generation, check_finalizers_while_deleting, check_resource_version, clear_server_meta, compose_update,
    content, copy_server_meta, finalizers, is_deleting, list_item, meta_str, namespace_defaults, owned_leaves,
    ownership_after_update, remove_key, set_managed_fields, set_meta,
};
use super::discovery::version_document;
use super::errors::{ApiError, Cause, method_not_allowed, patch_options_invalid, unsupported_media_type};
use super::http::{
    Reply, Req, ResourcePath, Route, apply_json_patch, check_name_matches, check_namespace_matches, check_type_meta,
    field_validation, merge_patch, now_rfc3339, parse_object, parse_route,
};
use super::selectors::{Selector, decode_continue, encode_continue};
use super::types::{
    Fault, HelmControllerSettings, NamespaceDeletion, RequestRecord, ResourceDef, Verb, builtin_resources,
};
use super::validation::CrdSchema;
use super::{EVENT_HISTORY, REQUEST_LOG};

/// A field path: map keys from the object's root. Lists are atomic, so paths never go inside one.
pub(super) type FieldPath = Vec<String>;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct Key {
    pub(super) group: String,
    pub(super) plural: String,
    /// Empty for cluster-scoped objects.
    pub(super) namespace: String,
    pub(super) name: String,
}

impl Key {
    pub(super) fn new(def: &ResourceDef, namespace: &str, name: &str) -> Key {
        Key::of(&def.group, &def.plural, if def.namespaced { namespace } else { "" }, name)
    }

    pub(super) fn of(group: &str, plural: &str, namespace: &str, name: &str) -> Key {
        Key { group: group.into(), plural: plural.into(), namespace: namespace.into(), name: name.into() }
    }

    pub(super) fn namespace(name: &str) -> Key {
        Key::of("", "namespaces", "", name)
    }

    pub(super) fn is_namespace(&self) -> bool {
        self.group.is_empty() && self.plural == "namespaces"
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Operation {
    Apply,
    Update,
}

impl Operation {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Operation::Apply => "Apply",
            Operation::Update => "Update",
        }
    }
}

/// Which part of an object a request writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Sub {
    Main,
    Status,
    Finalize,
}

impl Sub {
    pub(super) fn name(self) -> &'static str {
        match self {
            Sub::Main => "",
            Sub::Status => "status",
            Sub::Finalize => "finalize",
        }
    }
}

/// One `metadata.managedFields` entry, with its field set kept as paths.
#[derive(Clone, Debug)]
pub(super) struct ManagerEntry {
    pub(super) manager: String,
    pub(super) operation: Operation,
    pub(super) subresource: &'static str,
    pub(super) api_version: String,
    pub(super) time: String,
    pub(super) fields: BTreeSet<FieldPath>,
}

impl ManagerEntry {
    pub(super) fn is(&self, manager: &str, operation: Operation, sub: Sub) -> bool {
        self.manager == manager && self.operation == operation && self.subresource == sub.name()
    }

    pub(super) fn same_as(&self, other: &ManagerEntry) -> bool {
        self.manager == other.manager
            && self.operation == other.operation
            && self.subresource == other.subresource
            && self.api_version == other.api_version
            && self.fields == other.fields
    }
}

pub(super) fn same_managers(a: &[ManagerEntry], b: &[ManagerEntry]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.same_as(y))
}

pub(super) struct Stored {
    pub(super) obj: Value,
    pub(super) managers: Vec<ManagerEntry>,
}

pub(super) struct Event {
    pub(super) rv: u64,
    pub(super) etype: &'static str,
    pub(super) key: Key,
    pub(super) obj: Value,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FieldValidation {
    Ignore,
    Warn,
    Strict,
}

/// Who a create is recorded for.
pub(super) enum Owner {
    Update(String),
    Apply(String, BTreeSet<FieldPath>),
}

pub(super) enum Deleted {
    /// Still there, with a deletionTimestamp (finalizers, or a terminating namespace).
    Pending(Value),
    /// Gone; the last state.
    Gone(Value),
}

pub(super) struct State {
    pub(super) port: u16,
    pub(super) rv: u64,
    pub(super) seed: u64,
    pub(super) resources: Vec<(ResourceDef, bool)>,
    pub(super) objects: BTreeMap<Key, Stored>,
    pub(super) events: VecDeque<Event>,
    /// Events with a resourceVersion up to this one have been dropped from `events`.
    pub(super) events_floor: u64,
    pub(super) faults: Vec<Fault>,
    pub(super) fail_all: Option<u16>,
    pub(super) latency: Duration,
    pub(super) writes: u64,
    pub(super) changes: u64,
    pub(super) log: Vec<RequestRecord>,
    pub(super) helm: HelmControllerSettings,
    pub(super) ns_deletion: NamespaceDeletion,
    pub(super) released_namespaces: BTreeSet<String>,
    /// Namespaces to release after a delay, spawned once the lock is let go.
    pub(super) timers: Vec<(Duration, String)>,
    /// Objects changed since the controllers last looked.
    pub(super) dirty: BTreeSet<Key>,
    pub(super) crd: Result<Arc<CrdSchema>, String>,
    /// `Warning` headers for the request being served.
    pub(super) warnings: Vec<String>,
}

impl State {
    pub(super) fn new(port: u16) -> State {
        let seed = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0x9e37_79b9)
            ^ ((port as u64) << 32)
            | 1;
        let mut st = State {
            port,
            rv: 0,
            seed,
            resources: builtin_resources().into_iter().map(|d| (d, true)).collect(),
            objects: BTreeMap::new(),
            events: VecDeque::new(),
            events_floor: 0,
            faults: Vec::new(),
            fail_all: None,
            latency: Duration::ZERO,
            writes: 0,
            changes: 0,
            log: Vec::new(),
            helm: HelmControllerSettings::default(),
            ns_deletion: NamespaceDeletion::Immediate,
            released_namespaces: BTreeSet::new(),
            timers: Vec::new(),
            dirty: BTreeSet::new(),
            crd: CrdSchema::load().map(Arc::new),
            warnings: Vec::new(),
        };
        let ns_def = st.def_of(&Key::namespace("default")).unwrap_or_else(|| builtin_resources().remove(0));
        for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
            let _ = st.upsert(&ns_def, ns, "k3s");
        }
        st.dirty.clear();
        st
    }

    pub(super) fn rand(&mut self) -> u64 {
        // xorshift64*
        self.seed ^= self.seed >> 12;
        self.seed ^= self.seed << 25;
        self.seed ^= self.seed >> 27;
        self.seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(super) fn uid(&mut self) -> String {
        let (a, b) = (self.rand(), self.rand());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | ((b >> 48) & 0x3fff),
            b & 0xffff_ffff_ffff
        )
    }

    /// The stored objects of one resource, ordered by namespace and name.
    pub(super) fn of_kind<'a>(
        &'a self,
        group: &'a str,
        plural: &'a str,
    ) -> impl Iterator<Item = (&'a Key, &'a Stored)> + 'a {
        self.objects
            .range(Key::of(group, plural, "", "")..)
            .take_while(move |(k, _)| k.group == group && k.plural == plural)
    }

    pub(super) fn find_def(&self, name: &str) -> Option<ResourceDef> {
        self.resources.iter().find(|(d, _)| d.answers_to(name)).map(|(d, _)| d.clone())
    }

    pub(super) fn def_of(&self, key: &Key) -> Option<ResourceDef> {
        self.resources.iter().find(|(d, _)| d.group == key.group && d.plural == key.plural).map(|(d, _)| d.clone())
    }

    // ----- serving ---------------------------------------------------------------------------

    pub(super) fn serve(&mut self, req: &Req) -> Reply {
        self.warnings.clear();
        let rv_before = self.rv;
        if matches!(req.method, Method::POST | Method::PUT | Method::PATCH | Method::DELETE) {
            self.writes += 1;
        }
        let (reply, verb, resource) = match self.fail_all {
            Some(code) => (ApiError::server_wide(code).into(), None, String::new()),
            None => self.route(req),
        };
        let changed = self.rv != rv_before;
        if changed {
            self.changes += 1;
        }
        self.run_controllers();
        if self.log.len() < REQUEST_LOG {
            self.log.push(RequestRecord {
                method: req.method.to_string(),
                path: req.path.clone(),
                query: req.query_string.clone(),
                verb,
                resource,
                status: reply.code(),
                changed,
                warnings: self.warnings.clone(),
            });
        }
        reply
    }

    pub(super) fn route(&mut self, req: &Req) -> (Reply, Option<Verb>, String) {
        let aggregated = req.accept.contains("as=APIGroupDiscoveryList");
        let reply = match parse_route(&req.path) {
            Route::Version => Reply::ok(200, version_document()),
            Route::CoreVersions if aggregated => self.aggregated_discovery(true),
            Route::CoreVersions => Reply::ok(
                200,
                json!({
                    "kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                        "serverAddress": format!("127.0.0.1:{}", self.port)}],
                }),
            ),
            Route::Groups if aggregated => self.aggregated_discovery(false),
            Route::Groups => Reply::ok(200, self.group_list()),
            Route::Group(group) => match self.group_document(&group) {
                Some(doc) => Reply::ok(200, doc),
                None => ApiError::page_not_found().into(),
            },
            Route::GroupVersion(group, version) => match self.resource_list(&group, &version) {
                Some(doc) => Reply::ok(200, doc),
                None => ApiError::page_not_found().into(),
            },
            Route::Resource(path) => return self.serve_resource(req, path),
            Route::Unknown => ApiError::page_not_found().into(),
        };
        (reply, None, String::new())
    }

    pub(super) fn serve_resource(&mut self, req: &Req, path: ResourcePath) -> (Reply, Option<Verb>, String) {
        let plural = path.plural.clone();
        let served_gv = self.resources.iter().any(|(d, s)| *s && d.group == path.group && d.version == path.version);
        if !served_gv {
            return (ApiError::page_not_found().into(), None, plural);
        }
        let found = self
            .resources
            .iter()
            .find(|(d, s)| *s && d.group == path.group && d.version == path.version && d.plural == path.plural);
        let Some(def) = found.map(|(d, _)| d.clone()) else {
            return (ApiError::no_such_resource().into(), None, plural);
        };
        let named = path.name.is_some();
        let verb = match req.method {
            Method::GET if named => Verb::Get,
            Method::GET if req.flag("watch") => Verb::Watch,
            Method::GET => Verb::List,
            Method::POST if !named => Verb::Create,
            Method::PUT if named => Verb::Update,
            Method::PATCH if named => Verb::Patch,
            Method::DELETE if named => Verb::Delete,
            Method::DELETE => Verb::DeleteCollection,
            _ => return (method_not_allowed().into(), None, plural),
        };
        let scoped_ok = match (def.namespaced, path.namespace.is_some()) {
            (false, true) => false,
            (true, false) => matches!(verb, Verb::List | Verb::Watch),
            _ => true,
        };
        if !scoped_ok {
            return (ApiError::no_such_resource().into(), Some(verb), plural);
        }
        let sub = match path.sub.as_deref() {
            None => Sub::Main,
            Some("status") if def.status_subresource => Sub::Status,
            Some("finalize") if def.is_namespace() => Sub::Finalize,
            Some(_) => return (ApiError::no_such_resource().into(), Some(verb), plural),
        };
        let sub_ok = match sub {
            Sub::Main => true,
            Sub::Status => matches!(verb, Verb::Get | Verb::Update | Verb::Patch),
            Sub::Finalize => verb == Verb::Update,
        };
        if !sub_ok {
            return (method_not_allowed().into(), Some(verb), plural);
        }
        let namespace = path.namespace.clone().unwrap_or_default();
        let name = path.name.clone().unwrap_or_default();
        if let Some(e) = self.take_fault(verb, &def, path.namespace.as_deref(), &name) {
            return (e.into(), Some(verb), plural);
        }
        let result = match verb {
            Verb::Get => self.op_get(&def, &namespace, &name),
            Verb::List => self.op_list(&def, path.namespace.as_deref(), req),
            Verb::Watch => self.op_watch(&def, path.namespace.as_deref(), req),
            Verb::Create => self.op_create(&def, &namespace, req),
            Verb::Update => self.op_update(&def, &namespace, &name, sub, req),
            Verb::Patch => self.op_patch(&def, &namespace, &name, sub, req),
            Verb::Delete => self.op_delete(&def, &namespace, &name, req),
            Verb::DeleteCollection => self.op_delete_collection(&def, path.namespace.as_deref(), req),
            Verb::Any => Err(method_not_allowed()),
        };
        (result.unwrap_or_else(Reply::from), Some(verb), plural)
    }

    pub(super) fn take_fault(
        &mut self,
        verb: Verb,
        def: &ResourceDef,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<ApiError> {
        let index = self.faults.iter().position(|f| {
            f.count > 0
                && f.verb.matches(verb)
                && (f.resource == "*" || def.answers_to(&f.resource))
                && f.name.as_deref().is_none_or(|n| n == name)
        })?;
        let fault = &mut self.faults[index];
        fault.count -= 1;
        let (code, message) = (fault.status, fault.message.clone());
        if fault.count == 0 {
            self.faults.remove(index);
        }
        Some(ApiError::injected(code, verb, def, namespace, name, message.as_deref()))
    }

    // ----- reads -----------------------------------------------------------------------------

    pub(super) fn op_get(&self, def: &ResourceDef, namespace: &str, name: &str) -> Result<Reply, ApiError> {
        let stored = self.objects.get(&Key::new(def, namespace, name)).ok_or_else(|| ApiError::not_found(def, name))?;
        Ok(Reply::ok(200, stored.obj.clone()))
    }

    pub(super) fn op_list(&self, def: &ResourceDef, namespace: Option<&str>, req: &Req) -> Result<Reply, ApiError> {
        let selector = Selector::parse(req)?;
        let limit = req.q("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
        let after = match req.q("continue") {
            Some(token) => {
                Some(decode_continue(token).ok_or_else(|| ApiError::bad_request("continue key is not valid"))?)
            }
            None => None,
        };
        let matching: Vec<(&Key, &Stored)> = self
            .of_kind(&def.group, &def.plural)
            .filter(|(k, _)| namespace.is_none_or(|ns| k.namespace == ns))
            .filter(|(k, _)| after.as_ref().is_none_or(|(ns, n)| (&k.namespace, &k.name) > (ns, n)))
            .filter(|(_, s)| selector.matches(&s.obj))
            .collect();
        let mut metadata = json!({"resourceVersion": self.rv.to_string()});
        if matching.len() > limit {
            let last = matching[limit - 1].0;
            metadata["continue"] = json!(encode_continue(&last.namespace, &last.name));
            metadata["remainingItemCount"] = json!(matching.len() - limit);
        }
        let items: Vec<Value> = matching.iter().take(limit).map(|(_, s)| list_item(def, &s.obj)).collect();
        Ok(Reply::ok(
            200,
            json!({"kind": format!("{}List", def.kind), "apiVersion": def.api_version(), "metadata": metadata,
                "items": items}),
        ))
    }

    // ----- create ----------------------------------------------------------------------------

    pub(super) fn op_create(&mut self, def: &ResourceDef, namespace: &str, req: &Req) -> Result<Reply, ApiError> {
        let mut obj = parse_object(req)?;
        check_type_meta(def, &mut obj, false)?;
        check_namespace_matches(def, &mut obj, namespace)?;
        if meta_str(&obj, "name").is_none() {
            match meta_str(&obj, "generateName").map(str::to_string) {
                Some(prefix) => {
                    let suffix: String =
                        (0..5).map(|_| b"bcdfghjklmnpqrstvwxz2456789"[(self.rand() % 27) as usize] as char).collect();
                    set_meta(&mut obj, "name", json!(format!("{prefix}{suffix}")));
                }
                None => {
                    return Err(ApiError::invalid(
                        def,
                        "",
                        vec![Cause {
                            reason: "FieldValueRequired",
                            message: "Required value: name or generateName is required".into(),
                            field: "metadata.name".into(),
                        }],
                    ));
                }
            }
        }
        let fv = field_validation(req)?;
        self.prune(def, &mut obj, fv)?;
        let created = self.create_object(def, namespace, obj, Owner::Update(req.manager()), req.dry_run(), false)?;
        Ok(Reply::ok(201, created))
    }

    /// Stores a new object. `obj` has been type-checked and pruned; its name is set.
    pub(super) fn create_object(
        &mut self,
        def: &ResourceDef,
        namespace: &str,
        mut obj: Value,
        owner: Owner,
        dry_run: bool,
        keep_status: bool,
    ) -> Result<Value, ApiError> {
        let name = meta_str(&obj, "name").unwrap_or_default().to_string();
        let key = Key::new(def, namespace, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(def, &name));
        }
        if def.namespaced {
            self.check_namespace_open(def, &name, namespace)?;
        }
        clear_server_meta(&mut obj);
        if def.namespaced {
            set_meta(&mut obj, "namespace", json!(namespace));
        } else if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("namespace");
        }
        let is_node = def.group.is_empty() && def.plural == "nodes";
        if def.status_subresource && !keep_status && !is_node {
            remove_key(&mut obj, "status");
        }
        if def.is_namespace() {
            namespace_defaults(&mut obj, &name, None, Sub::Main);
        }
        self.apply_defaults(def, &mut obj);
        self.validate(def, None, &obj)?;
        let uid = self.uid();
        set_meta(&mut obj, "uid", json!(uid));
        set_meta(&mut obj, "creationTimestamp", json!(now_rfc3339()));
        if !def.group.is_empty() {
            set_meta(&mut obj, "generation", json!(1));
        }
        let (manager, operation, fields) = match owner {
            Owner::Update(m) => {
                let fields = owned_leaves(&obj, def, Sub::Main);
                (m, Operation::Update, fields)
            }
            Owner::Apply(m, fields) => (m, Operation::Apply, fields),
        };
        let mut managers = Vec::new();
        if !fields.is_empty() {
            managers.push(ManagerEntry {
                manager,
                operation,
                subresource: "",
                api_version: def.api_version(),
                time: now_rfc3339(),
                fields,
            });
        }
        if dry_run {
            set_managed_fields(&mut obj, &managers);
            return Ok(obj);
        }
        Ok(self.commit(key, obj, managers, "ADDED"))
    }

    pub(super) fn check_namespace_open(&self, def: &ResourceDef, name: &str, namespace: &str) -> Result<(), ApiError> {
        match self.objects.get(&Key::namespace(namespace)) {
            None => Err(ApiError::namespace_not_found(namespace)),
            Some(s) if is_deleting(&s.obj) => Err(ApiError::terminating(def, name, namespace)),
            Some(_) => Ok(()),
        }
    }

    // ----- update (PUT) and the writes that share its path -----------------------------------

    pub(super) fn op_update(
        &mut self,
        def: &ResourceDef,
        namespace: &str,
        name: &str,
        sub: Sub,
        req: &Req,
    ) -> Result<Reply, ApiError> {
        let mut body = parse_object(req)?;
        check_type_meta(def, &mut body, false)?;
        check_name_matches(&mut body, name)?;
        check_namespace_matches(def, &mut body, namespace)?;
        let fv = field_validation(req)?;
        let key = Key::new(def, namespace, name);
        let old = self.objects.get(&key).map(|s| s.obj.clone()).ok_or_else(|| ApiError::not_found(def, name))?;
        check_resource_version(def, name, &body, &old)?;
        self.prune(def, &mut body, fv)?;
        let new = compose_update(def, sub, &old, body);
        let obj = self.update_object(def, &key, new, &req.manager(), sub, req.dry_run())?;
        Ok(Reply::ok(200, obj))
    }

    /// Writes `new` over the stored object as an `Update` operation by `manager`.
    pub(super) fn update_object(
        &mut self,
        def: &ResourceDef,
        key: &Key,
        mut new: Value,
        manager: &str,
        sub: Sub,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let stored = self.objects.get(key).ok_or_else(|| ApiError::not_found(def, &key.name))?;
        let (old, old_managers) = (stored.obj.clone(), stored.managers.clone());
        if let Some(meta) = new.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("managedFields");
            meta.remove("resourceVersion");
        }
        if def.is_namespace() {
            namespace_defaults(&mut new, &key.name, Some(&old), sub);
        }
        self.apply_defaults(def, &mut new);
        check_finalizers_while_deleting(def, &old, &new)?;
        self.validate(def, Some(&old), &new)?;
        bump_generation(def, &old, &mut new);
        let managers = ownership_after_update(def, &old, &new, old_managers.clone(), manager, sub);
        self.finish_write(def, key, &old, &old_managers, new, managers, (manager, Operation::Update, sub), dry_run)
    }

    /// Commits a write unless it changes nothing; removes the object when it is being deleted
    /// and its last finalizer went.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn finish_write(
        &mut self,
        def: &ResourceDef,
        key: &Key,
        old: &Value,
        old_managers: &[ManagerEntry],
        mut new: Value,
        mut managers: Vec<ManagerEntry>,
        writer: (&str, Operation, Sub),
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        if content(old) == content(&new) && same_managers(old_managers, &managers) {
            return Ok(old.clone());
        }
        let now = now_rfc3339();
        for entry in managers.iter_mut().filter(|e| e.is(writer.0, writer.1, writer.2)) {
            entry.time = now.clone();
        }
        if dry_run {
            set_managed_fields(&mut new, &managers);
            if let Some(rv) = old.pointer("/metadata/resourceVersion") {
                set_meta(&mut new, "resourceVersion", rv.clone());
            }
            return Ok(new);
        }
        let obj = self.commit(key.clone(), new, managers, "MODIFIED");
        if is_deleting(&obj) && finalizers(&obj).is_empty() && !def.is_namespace() {
            self.purge(key, false);
        }
        Ok(obj)
    }

    // ----- patch -----------------------------------------------------------------------------

    pub(super) fn op_patch(
        &mut self,
        def: &ResourceDef,
        namespace: &str,
        name: &str,
        sub: Sub,
        req: &Req,
    ) -> Result<Reply, ApiError> {
        let media = req.media_type();
        if media == "application/apply-patch+yaml" {
            return self.op_apply(def, namespace, name, sub, req);
        }
        let json_patch = match media.as_str() {
            "application/merge-patch+json" => false,
            // Built-in kinds: approximated by a JSON merge patch (lists are replaced, not merged by key).
            "application/strategic-merge-patch+json" if !def.custom => false,
            "application/json-patch+json" => true,
            _ => return Err(unsupported_media_type()),
        };
        if req.q("force").is_some() {
            return Err(patch_options_invalid(
                "force",
                "FieldValueForbidden",
                "Forbidden: may not be specified for non-apply patch",
            ));
        }
        let fv = field_validation(req)?;
        let key = Key::new(def, namespace, name);
        let old = self.objects.get(&key).map(|s| s.obj.clone()).ok_or_else(|| ApiError::not_found(def, name))?;
        let patch: Value = serde_json::from_slice(&req.body)
            .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
        let mut patched = old.clone();
        if json_patch {
            apply_json_patch(&mut patched, &patch).map_err(|m| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the server rejected our request due to an error in our request: {m}"),
                )
            })?;
        } else {
            if !patch.is_object() {
                return Err(ApiError::bad_request("error decoding patch: a merge patch must be a JSON object"));
            }
            merge_patch(&mut patched, &patch);
        }
        if meta_str(&patched, "resourceVersion") != meta_str(&old, "resourceVersion") {
            return Err(ApiError::modified(def, name));
        }
        if meta_str(&patched, "name") != Some(name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                meta_str(&patched, "name").unwrap_or("")
            )));
        }
        check_type_meta(def, &mut patched, false)?;
        self.prune(def, &mut patched, fv)?;
        let new = compose_update(def, sub, &old, patched);
        let obj = self.update_object(def, &key, new, &req.manager(), sub, req.dry_run())?;
        Ok(Reply::ok(200, obj))
    }

    // ----- delete ----------------------------------------------------------------------------

    pub(super) fn op_delete(
        &mut self,
        def: &ResourceDef,
        namespace: &str,
        name: &str,
        req: &Req,
    ) -> Result<Reply, ApiError> {
        let opts: Value = if req.body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            serde_json::from_slice(&req.body)
                .map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))?
        };
        let propagation = opts
            .get("propagationPolicy")
            .and_then(Value::as_str)
            .or(req.q("propagationPolicy"))
            .unwrap_or("Background");
        let orphan = propagation == "Orphan" || opts.get("orphanDependents") == Some(&json!(true));
        let dry_run =
            req.dry_run() || opts.get("dryRun").and_then(Value::as_array).is_some_and(|a| a.iter().any(|v| v == "All"));
        let key = Key::new(def, namespace, name);
        let obj = self.objects.get(&key).map(|s| s.obj.clone()).ok_or_else(|| ApiError::not_found(def, name))?;
        if let Some(pre) = opts.get("preconditions") {
            for (field, what) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
                if let Some(wanted) = pre.get(field).and_then(Value::as_str) {
                    let actual = meta_str(&obj, field).unwrap_or("");
                    if wanted != actual {
                        return Err(ApiError::precondition(def, name, what, wanted, actual));
                    }
                }
            }
        }
        if def.is_namespace() {
            if matches!(name, "default" | "kube-system" | "kube-public") {
                return Err(ApiError::new(
                    403,
                    "Forbidden",
                    format!("namespaces \"{name}\" is forbidden: this namespace may not be deleted"),
                )
                .with_details(ApiError::object_details(def, name)));
            }
            if is_deleting(&obj) {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on namespaces \"{name}\": The system is ensuring all content is \
                         removed from this namespace.  Upon completion, this namespace will automatically be purged by \
                         the system."
                    ),
                )
                .with_details(ApiError::object_details(def, name)));
            }
        }
        if dry_run {
            return Ok(Reply::ok(200, obj));
        }
        match self.delete_object(&key, orphan) {
            Some(Deleted::Pending(obj)) => Ok(Reply::ok(200, obj)),
            Some(Deleted::Gone(obj)) if def.custom || def.is_namespace() => Ok(Reply::ok(200, obj)),
            Some(Deleted::Gone(obj)) => {
                let mut details = json!({"name": name, "kind": def.plural, "uid": meta_str(&obj, "uid").unwrap_or("")});
                if !def.group.is_empty() {
                    details["group"] = json!(def.group);
                }
                Ok(Reply::ok(
                    200,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                        "details": details}),
                ))
            }
            None => Err(ApiError::not_found(def, name)),
        }
    }

    pub(super) fn op_delete_collection(
        &mut self,
        def: &ResourceDef,
        namespace: Option<&str>,
        req: &Req,
    ) -> Result<Reply, ApiError> {
        let selector = Selector::parse(req)?;
        let keys: Vec<Key> = self
            .of_kind(&def.group, &def.plural)
            .filter(|(k, _)| namespace.is_none_or(|ns| k.namespace == ns))
            .filter(|(_, s)| selector.matches(&s.obj))
            .map(|(k, _)| k.clone())
            .collect();
        let mut items = Vec::new();
        for key in keys {
            if def.is_namespace() && matches!(key.name.as_str(), "default" | "kube-system" | "kube-public") {
                continue;
            }
            if req.dry_run() {
                items.extend(self.objects.get(&key).map(|s| list_item(def, &s.obj)));
                continue;
            }
            match self.delete_object(&key, false) {
                Some(Deleted::Pending(obj) | Deleted::Gone(obj)) => items.push(list_item(def, &obj)),
                None => {}
            }
        }
        Ok(Reply::ok(
            200,
            json!({"kind": format!("{}List", def.kind), "apiVersion": def.api_version(),
                   "metadata": {"resourceVersion": self.rv.to_string()}, "items": items}),
        ))
    }

    /// Deletes as the API server does: an object with finalizers (or a namespace) gets a
    /// deletionTimestamp and stays; otherwise it goes, and its dependents (by ownerReferences)
    /// go too, or are orphaned.
    pub(super) fn delete_object(&mut self, key: &Key, orphan: bool) -> Option<Deleted> {
        let (obj, managers) = self.objects.get(key).map(|s| (s.obj.clone(), s.managers.clone()))?;
        if is_deleting(&obj) {
            return Some(Deleted::Pending(obj));
        }
        if key.is_namespace() {
            let mut new = obj;
            set_meta(&mut new, "deletionTimestamp", json!(now_rfc3339()));
            set_meta(&mut new, "deletionGracePeriodSeconds", json!(0));
            new["status"] = json!({"phase": "Terminating"});
            let committed = self.commit(key.clone(), new, managers, "MODIFIED");
            if let NamespaceDeletion::After(delay) = self.ns_deletion {
                self.timers.push((delay, key.name.clone()));
            }
            return Some(Deleted::Pending(committed));
        }
        if !finalizers(&obj).is_empty() {
            let mut new = obj;
            set_meta(&mut new, "deletionTimestamp", json!(now_rfc3339()));
            set_meta(&mut new, "deletionGracePeriodSeconds", json!(0));
            return Some(Deleted::Pending(self.commit(key.clone(), new, managers, "MODIFIED")));
        }
        self.purge(key, orphan).map(Deleted::Gone)
    }

    /// Removes an object now, then its dependents (garbage collection by ownerReferences).
    pub(super) fn purge(&mut self, key: &Key, orphan: bool) -> Option<Value> {
        let stored = self.objects.remove(key)?;
        let mut obj = stored.obj;
        self.rv += 1;
        set_meta(&mut obj, "resourceVersion", json!(self.rv.to_string()));
        self.push_event("DELETED", key, &obj);
        self.dirty.insert(key.clone());
        if key.is_namespace() {
            self.released_namespaces.remove(&key.name);
        }
        let uid = meta_str(&obj, "uid").unwrap_or("").to_string();
        let dependents: Vec<Key> = self
            .objects
            .iter()
            .filter(|(_, s)| {
                s.obj
                    .pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
                    .is_some_and(|refs| refs.iter().any(|r| r.get("uid").and_then(Value::as_str) == Some(&uid)))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for dependent in dependents {
            if orphan {
                self.internal_update(&dependent, "kube-controller-manager", Sub::Main, |o| {
                    if let Some(refs) = o.pointer_mut("/metadata/ownerReferences").and_then(Value::as_array_mut) {
                        refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(&uid));
                    }
                });
            } else {
                self.delete_object(&dependent, false);
            }
        }
        Some(obj)
    }

    // ----- storage ---------------------------------------------------------------------------

    pub(super) fn commit(
        &mut self,
        key: Key,
        mut obj: Value,
        managers: Vec<ManagerEntry>,
        etype: &'static str,
    ) -> Value {
        self.rv += 1;
        set_meta(&mut obj, "resourceVersion", json!(self.rv.to_string()));
        set_managed_fields(&mut obj, &managers);
        self.push_event(etype, &key, &obj);
        self.dirty.insert(key.clone());
        self.objects.insert(key, Stored { obj: obj.clone(), managers });
        obj
    }

    pub(super) fn push_event(&mut self, etype: &'static str, key: &Key, obj: &Value) {
        self.events.push_back(Event { rv: self.rv, etype, key: key.clone(), obj: obj.clone() });
        while self.events.len() > EVENT_HISTORY {
            if let Some(old) = self.events.pop_front() {
                self.events_floor = old.rv;
            }
        }
    }

    /// A write by a controller (an `Update` by `manager`), skipping validation errors.
    pub(super) fn internal_update(
        &mut self,
        key: &Key,
        manager: &str,
        sub: Sub,
        change: impl FnOnce(&mut Value),
    ) -> Option<Value> {
        let def = self.def_of(key)?;
        let mut new = self.objects.get(key)?.obj.clone();
        change(&mut new);
        self.update_object(&def, key, new, manager, sub, false).ok()
    }

    /// Create or replace for tests and for the fake controllers; status is taken as given.
    pub(super) fn upsert(&mut self, def: &ResourceDef, mut obj: Value, manager: &str) -> Result<Value, ApiError> {
        check_type_meta(def, &mut obj, false)?;
        let name = meta_str(&obj, "name").unwrap_or_default().to_string();
        let namespace =
            if def.namespaced { meta_str(&obj, "namespace").unwrap_or("default").to_string() } else { String::new() };
        let key = Key::new(def, &namespace, &name);
        match self.objects.get(&key).map(|s| s.obj.clone()) {
            None => self.create_object(def, &namespace, obj, Owner::Update(manager.to_string()), false, true),
            Some(old) => {
                copy_server_meta(&old, &mut obj);
                self.update_object(def, &key, obj, manager, Sub::Main, false)
            }
        }
    }
}

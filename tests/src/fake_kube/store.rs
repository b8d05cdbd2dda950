//! The objects, their keys, managers and events, the server's state, and the routing of a request
//! to the verb that serves it (the verbs themselves are in `verbs.rs`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::Method;
use serde_json::{Value, json};

use super::REQUEST_LOG;
use super::discovery::version_document;
use super::errors::{ApiError, method_not_allowed};
use super::http::{Reply, Req, ResourcePath, Route, parse_route};
use super::types::{
    Fault, HelmControllerSettings, NamespaceDeletion, RequestRecord, ResourceDef, Verb, builtin_resources,
};
use super::validation::CrdSchema;

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
    /// The cluster's CA, which the token controller puts in every token Secret.
    pub(super) cluster_ca_pem: String,
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
            cluster_ca_pem: rcgen::KeyPair::generate()
                .and_then(|key| rcgen::CertificateParams::new(vec!["kubernetes".to_string()])?.self_signed(&key))
                .map(|cert| cert.pem())
                .unwrap_or_default(),
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
        let user = match self.authenticate(req) {
            Ok(user) => user,
            Err(e) => return (e.into(), None, String::new()),
        };
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
            Route::Resource(path) => return self.serve_resource(req, path, &user),
            Route::Unknown => ApiError::page_not_found().into(),
        };
        (reply, None, String::new())
    }

    pub(super) fn serve_resource(
        &mut self,
        req: &Req,
        path: ResourcePath,
        user: &super::auth::User,
    ) -> (Reply, Option<Verb>, String) {
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
        if let Err(e) = self.authorize(user, verb, &def, sub, path.namespace.as_deref(), &name) {
            return (e.into(), Some(verb), plural);
        }
        // An apply that creates the object needs the right to create it too.
        let creates = verb == Verb::Patch
            && req.media_type() == "application/apply-patch+yaml"
            && !self.objects.contains_key(&Key::new(&def, &namespace, &name));
        if creates {
            if let Err(e) = self.authorize(user, Verb::Create, &def, sub, path.namespace.as_deref(), &name) {
                return (e.into(), Some(verb), plural);
            }
        }
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
}

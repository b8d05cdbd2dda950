//! The verbs that read and write the stored objects: get, list, create, update, patch (merge,
//! JSON and server-side apply), delete and delete-collection, with what each commits and the
//! events it sends.

use serde_json::{Value, json};

use super::EVENT_HISTORY;
use super::apply::{
    bump_generation, check_finalizers_while_deleting, check_resource_version, clear_server_meta, compose_update,
    content, copy_server_meta, finalizers, is_deleting, list_item, meta_str, namespace_defaults, owned_leaves,
    ownership_after_update, remove_key, set_managed_fields, set_meta,
};
use super::errors::{ApiError, Cause, patch_options_invalid, unsupported_media_type};
use super::http::{
    Reply, Req, apply_json_patch, check_name_matches, check_namespace_matches, check_type_meta, field_validation,
    merge_patch, now_rfc3339, parse_object,
};
use super::selectors::{Selector, decode_continue, encode_continue};
use super::types::{NamespaceDeletion, ResourceDef};

use super::store::{Deleted, Event, Key, ManagerEntry, Operation, Owner, State, Stored, Sub, same_managers};

impl State {
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

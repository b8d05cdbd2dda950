//! Server-side apply: field ownership (`managedFields`), conflicts, and the object surgery that
//! merges an applied configuration into the live object.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use super::errors::{ApiError, Cause, conflict_error, patch_options_invalid};
use super::http::{
    Reply, Req, check_name_matches, check_namespace_matches, check_type_meta, field_validation, now_rfc3339,
    parse_object,
};
use super::store::{FieldPath, Key, ManagerEntry, Operation, Owner, State, Sub};
use super::types::ResourceDef;

impl State {
    /// Server-side apply.
    pub(super) fn op_apply(
        &mut self,
        def: &ResourceDef,
        namespace: &str,
        name: &str,
        sub: Sub,
        req: &Req,
    ) -> Result<Reply, ApiError> {
        let Some(manager) = req.q("fieldManager").map(str::to_string) else {
            return Err(patch_options_invalid(
                "fieldManager",
                "FieldValueRequired",
                "Required value: is required for apply patch",
            ));
        };
        let mut config = parse_object(req)?;
        check_type_meta(def, &mut config, true)?;
        check_name_matches(&mut config, name)?;
        check_namespace_matches(def, &mut config, namespace)?;
        let fv = field_validation(req)?;
        strip_nulls(&mut config);
        self.prune(def, &mut config, fv)?;
        let key = Key::new(def, namespace, name);
        let existing = self.objects.get(&key).map(|s| (s.obj.clone(), s.managers.clone()));
        if let Some(wanted) = meta_str(&config, "resourceVersion") {
            let current = existing.as_ref().and_then(|(o, _)| meta_str(o, "resourceVersion"));
            if current != Some(wanted) {
                return Err(ApiError::modified(def, name));
            }
        }
        let config = scope_config(def, sub, config);
        let fields = owned_leaves(&config, def, sub);
        let Some((live, managers)) = existing else {
            if sub != Sub::Main {
                return Err(ApiError::not_found(def, name));
            }
            let mut config = config;
            config["apiVersion"] = json!(def.api_version());
            config["kind"] = json!(def.kind);
            set_meta(&mut config, "name", json!(name));
            let created =
                self.create_object(def, namespace, config, Owner::Apply(manager, fields), req.dry_run(), false)?;
            return Ok(Reply::ok(201, created));
        };

        let mut merged = live.clone();
        apply_merge(&mut merged, &config);
        let previous = managers
            .iter()
            .find(|e| e.is(&manager, Operation::Apply, sub))
            .map(|e| e.fields.clone())
            .unwrap_or_default();
        for dropped in previous.difference(&fields) {
            let kept_by_other = managers
                .iter()
                .filter(|e| !e.is(&manager, Operation::Apply, sub))
                .any(|e| e.fields.iter().any(|q| q.starts_with(dropped)));
            if !kept_by_other {
                remove_path(&mut merged, dropped);
            }
        }
        if def.is_namespace() {
            namespace_defaults(&mut merged, name, Some(&live), sub);
        }
        self.apply_defaults(def, &mut merged);

        let conflicts: Vec<(usize, FieldPath)> = managers
            .iter()
            .enumerate()
            .filter(|(_, e)| e.manager != manager)
            .flat_map(|(i, e)| e.fields.iter().map(move |p| (i, p)))
            .filter(|(_, p)| get_path(&live, p) != get_path(&merged, p))
            .map(|(i, p)| (i, p.clone()))
            .collect();
        let mut managers_after = managers.clone();
        if !conflicts.is_empty() {
            if !req.flag("force") {
                return Err(conflict_error(&managers, &conflicts));
            }
            for (i, p) in &conflicts {
                managers_after[*i].fields.retain(|q| !overlaps(q, p));
            }
        }
        match managers_after.iter_mut().find(|e| e.is(&manager, Operation::Apply, sub)) {
            Some(entry) => {
                entry.fields = fields;
                entry.api_version = def.api_version();
            }
            None => managers_after.push(ManagerEntry {
                manager: manager.clone(),
                operation: Operation::Apply,
                subresource: sub.name(),
                api_version: def.api_version(),
                time: now_rfc3339(),
                fields,
            }),
        }
        retain_existing(&mut managers_after, &merged);
        check_finalizers_while_deleting(def, &live, &merged)?;
        self.validate(def, Some(&live), &merged)?;
        bump_generation(def, &live, &mut merged);
        let obj = self.finish_write(
            def,
            &key,
            &live,
            &managers,
            merged,
            managers_after,
            (&manager, Operation::Apply, sub),
            req.dry_run(),
        )?;
        Ok(Reply::ok(200, obj))
    }
}

/// Metadata fields the server owns: never part of a field set, never taken from a request.
pub(super) const SERVER_META: [&str; 8] = [
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// The leaf field paths of `obj` that a write to `sub` can own.
pub(super) fn owned_leaves(obj: &Value, def: &ResourceDef, sub: Sub) -> BTreeSet<FieldPath> {
    let scoped = scope_config(def, sub, obj.clone());
    let mut out = BTreeSet::new();
    collect_leaves(&scoped, &mut Vec::new(), &mut out);
    out
}

/// The part of a request body a write to `sub` may set.
pub(super) fn scope_config(def: &ResourceDef, sub: Sub, mut obj: Value) -> Value {
    if let Some(map) = obj.as_object_mut() {
        map.remove("apiVersion");
        map.remove("kind");
        if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
            for field in SERVER_META.iter().chain(&["name", "namespace"]) {
                meta.remove(*field);
            }
            if meta.is_empty() {
                map.remove("metadata");
            }
        }
        match sub {
            Sub::Main if def.status_subresource => {
                map.remove("status");
            }
            Sub::Main => {}
            Sub::Status => map.retain(|k, _| k == "status"),
            Sub::Finalize => {
                let finalizers = map.get("spec").and_then(|s| s.get("finalizers")).cloned();
                map.clear();
                if let Some(f) = finalizers {
                    map.insert("spec".into(), json!({"finalizers": f}));
                }
            }
        }
    }
    obj
}

pub(super) fn collect_leaves(v: &Value, prefix: &mut Vec<String>, out: &mut BTreeSet<FieldPath>) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (k, child) in map {
                prefix.push(k.clone());
                collect_leaves(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {
            if !prefix.is_empty() {
                out.insert(prefix.clone());
            }
        }
    }
}

pub(super) fn get_path<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |node, k| node.as_object()?.get(k))
}

/// Removes the field, then any map it leaves empty on the way up.
pub(super) fn remove_path(v: &mut Value, path: &[String]) {
    let Some((first, rest)) = path.split_first() else { return };
    let Some(map) = v.as_object_mut() else { return };
    if rest.is_empty() {
        map.remove(first);
        return;
    }
    if let Some(child) = map.get_mut(first) {
        remove_path(child, rest);
        if child.as_object().is_some_and(Map::is_empty) {
            map.remove(first);
        }
    }
}

pub(super) fn overlaps(a: &[String], b: &[String]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// `.metadata.labels.a`: how SSA names a field in conflicts.
pub(super) fn dotted(path: &[String]) -> String {
    path.iter().map(|p| format!(".{p}")).collect()
}

/// Server-side apply's merge: maps merge key by key, everything else (lists included) is replaced.
pub(super) fn apply_merge(live: &mut Value, config: &Value) {
    match (live, config) {
        (Value::Object(l), Value::Object(c)) => {
            for (k, cv) in c {
                match l.get_mut(k) {
                    Some(lv) if lv.is_object() && cv.is_object() => apply_merge(lv, cv),
                    _ => {
                        l.insert(k.clone(), cv.clone());
                    }
                }
            }
        }
        (l, c) => *l = c.clone(),
    }
}

/// Ownership after an `Update`: the writer takes the fields whose value it changed.
pub(super) fn ownership_after_update(
    def: &ResourceDef,
    old: &Value,
    new: &Value,
    mut managers: Vec<ManagerEntry>,
    manager: &str,
    sub: Sub,
) -> Vec<ManagerEntry> {
    let changed: BTreeSet<FieldPath> =
        owned_leaves(new, def, sub).into_iter().filter(|p| get_path(old, p) != get_path(new, p)).collect();
    for entry in managers.iter_mut().filter(|e| !e.is(manager, Operation::Update, sub)) {
        entry.fields.retain(|q| !changed.iter().any(|p| overlaps(p, q)));
    }
    if !changed.is_empty() {
        match managers.iter_mut().find(|e| e.is(manager, Operation::Update, sub)) {
            Some(entry) => {
                entry.fields.extend(changed);
                entry.api_version = def.api_version();
            }
            None => managers.push(ManagerEntry {
                manager: manager.to_string(),
                operation: Operation::Update,
                subresource: sub.name(),
                api_version: def.api_version(),
                time: now_rfc3339(),
                fields: changed,
            }),
        }
    }
    retain_existing(&mut managers, new);
    managers
}

/// Drops owned paths that no longer exist, and entries left with none.
pub(super) fn retain_existing(managers: &mut Vec<ManagerEntry>, obj: &Value) {
    for entry in managers.iter_mut() {
        entry.fields.retain(|p| get_path(obj, p).is_some());
    }
    managers.retain(|e| !e.fields.is_empty());
}

pub(super) fn set_managed_fields(obj: &mut Value, managers: &[ManagerEntry]) {
    let entries: Vec<Value> = managers
        .iter()
        .map(|e| {
            let mut fields = Map::new();
            for path in &e.fields {
                let mut node = &mut fields;
                for k in path {
                    let child = node.entry(format!("f:{k}")).or_insert_with(|| json!({}));
                    if !child.is_object() {
                        *child = json!({});
                    }
                    let Some(map) = child.as_object_mut() else { break };
                    node = map;
                }
            }
            let mut entry = json!({
                "manager": e.manager, "operation": e.operation.as_str(), "apiVersion": e.api_version,
                "time": e.time, "fieldsType": "FieldsV1", "fieldsV1": fields,
            });
            if !e.subresource.is_empty() {
                entry["subresource"] = json!(e.subresource);
            }
            entry
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if entries.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(entries));
        }
    }
}

/// The object without the fields every write changes.
pub(super) fn content(obj: &Value) -> Value {
    let mut c = obj.clone();
    if let Some(meta) = c.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
        meta.remove("resourceVersion");
    }
    c
}

/// Everything but metadata and status: what `metadata.generation` counts changes of.
pub(super) fn spec_part(obj: &Value) -> Value {
    let mut c = obj.clone();
    if let Some(map) = c.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    c
}

pub(super) fn bump_generation(def: &ResourceDef, old: &Value, new: &mut Value) {
    if def.group.is_empty() {
        return;
    }
    let generation = old.pointer("/metadata/generation").and_then(Value::as_u64).unwrap_or(1);
    let next = if spec_part(old) == spec_part(new) { generation } else { generation + 1 };
    set_meta(new, "generation", json!(next));
}

/// Builds the object a PUT (or a non-apply patch) to `sub` asks for.
pub(super) fn compose_update(def: &ResourceDef, sub: Sub, old: &Value, body: Value) -> Value {
    match sub {
        Sub::Main => {
            let mut new = body;
            copy_server_meta(old, &mut new);
            if def.status_subresource {
                match old.get("status") {
                    Some(status) => new["status"] = status.clone(),
                    None => remove_key(&mut new, "status"),
                }
            }
            new
        }
        Sub::Status => {
            let mut new = old.clone();
            match body.get("status") {
                Some(status) => new["status"] = status.clone(),
                None => remove_key(&mut new, "status"),
            }
            new
        }
        Sub::Finalize => {
            let mut new = old.clone();
            let finalizers = body.pointer("/spec/finalizers").cloned().unwrap_or(json!([]));
            if !new.get("spec").is_some_and(Value::is_object) {
                new["spec"] = json!({});
            }
            new["spec"]["finalizers"] = finalizers;
            new
        }
    }
}

pub(super) fn copy_server_meta(old: &Value, new: &mut Value) {
    for field in
        ["uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation", "namespace"]
    {
        match old.pointer(&format!("/metadata/{field}")) {
            Some(v) => set_meta(new, field, v.clone()),
            None => {
                if let Some(meta) = new.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.remove(field);
                }
            }
        }
    }
}

pub(super) fn clear_server_meta(obj: &mut Value) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        for field in SERVER_META {
            meta.remove(field);
        }
    }
}

/// Namespaces: the immutable name label, the `kubernetes` finalizer and the phase are the server's;
/// `spec.finalizers` only changes through `/finalize`.
pub(super) fn namespace_defaults(obj: &mut Value, name: &str, old: Option<&Value>, sub: Sub) {
    set_map_entry(obj, &["metadata", "labels"], "kubernetes.io/metadata.name", json!(name));
    match old {
        None => {
            if !obj.get("spec").is_some_and(Value::is_object) {
                obj["spec"] = json!({});
            }
            if obj["spec"].get("finalizers").is_none() {
                obj["spec"]["finalizers"] = json!(["kubernetes"]);
            }
            obj["status"] = json!({"phase": "Active"});
        }
        Some(old) => {
            if sub != Sub::Finalize {
                match old.get("spec") {
                    Some(spec) => obj["spec"] = spec.clone(),
                    None => remove_key(obj, "spec"),
                }
            }
            if sub != Sub::Status
                && let Some(status) = old.get("status")
            {
                obj["status"] = status.clone();
            }
        }
    }
}

pub(super) fn check_finalizers_while_deleting(def: &ResourceDef, old: &Value, new: &Value) -> Result<(), ApiError> {
    if !is_deleting(old) {
        return Ok(());
    }
    let before = finalizers(old);
    let added: Vec<String> = finalizers(new).into_iter().filter(|f| !before.contains(f)).collect();
    if added.is_empty() {
        return Ok(());
    }
    Err(ApiError::invalid(
        def,
        meta_str(old, "name").unwrap_or(""),
        vec![Cause {
            reason: "FieldValueForbidden",
            message: format!(
                "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers {added:?}"
            ),
            field: "metadata.finalizers".into(),
        }],
    ))
}

pub(super) fn check_resource_version(def: &ResourceDef, name: &str, body: &Value, old: &Value) -> Result<(), ApiError> {
    match meta_str(body, "resourceVersion") {
        Some(rv) if Some(rv) != meta_str(old, "resourceVersion") => Err(ApiError::modified(def, name)),
        _ => Ok(()),
    }
}

pub(super) fn is_deleting(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp").is_some_and(|v| !v.is_null())
}

pub(super) fn finalizers(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default()
}

pub(super) fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str().filter(|s| !s.is_empty())
}

pub(super) fn set_meta(obj: &mut Value, field: &str, value: Value) {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"][field] = value;
}

/// Sets `key` in the map at `path`, creating the maps on the way.
pub(super) fn set_map_entry(obj: &mut Value, path: &[&str], key: &str, value: Value) {
    let mut node = obj;
    for p in path {
        if !node.get(*p).is_some_and(Value::is_object) {
            node[*p] = json!({});
        }
        node = &mut node[*p];
    }
    node[key] = value;
}

pub(super) fn remove_key(obj: &mut Value, key: &str) {
    if let Some(map) = obj.as_object_mut() {
        map.remove(key);
    }
}

pub(super) fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.retain(|_, child| !child.is_null());
            map.values_mut().for_each(strip_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

pub(super) fn list_item(def: &ResourceDef, obj: &Value) -> Value {
    let mut item = obj.clone();
    if !def.custom
        && let Some(map) = item.as_object_mut()
    {
        // Typed lists from the API server leave these out of their items.
        map.remove("apiVersion");
        map.remove("kind");
    }
    item
}

//! Validation: names, labels, taints, and the HelmChart CRD schema (pruning, defaults).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Value, json};

use super::HELMCHART_CRD;
use super::apply::{dotted, finalizers, get_path, meta_str};
use super::errors::{ApiError, Cause};
use super::store::{FieldPath, FieldValidation, State};
use super::types::ResourceDef;

/// The HelmChart CRD's `openAPIV3Schema`, compiled once per process.
pub(super) struct CrdSchema {
    pub(super) schema: Value,
    pub(super) validator: jsonschema::Validator,
    /// Fields under `x-kubernetes-validations` transition rules that make them immutable.
    pub(super) immutable: Vec<(FieldPath, String)>,
}

impl CrdSchema {
    pub(super) fn load() -> Result<CrdSchema, String> {
        type Loaded = Result<(Value, Vec<(FieldPath, String)>), String>;
        static CRD: std::sync::OnceLock<Loaded> = std::sync::OnceLock::new();
        let (schema, immutable) = CRD
            .get_or_init(|| {
                let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(HELMCHART_CRD);
                let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                // serde_norway: the maintained fork of serde_yaml (archived), already the workspace's YAML crate.
                let crd: Value = serde_norway::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
                let schema = crd
                    .pointer("/spec/versions/0/schema/openAPIV3Schema")
                    .cloned()
                    .ok_or_else(|| format!("{}: no spec.versions[0].schema.openAPIV3Schema", path.display()))?;
                let mut immutable = Vec::new();
                collect_immutable(&schema, &mut Vec::new(), &mut immutable);
                Ok((schema, immutable))
            })
            .clone()?;
        // OpenAPI v3.0 schemas are JSON Schema draft 4 plus extensions (`x-kubernetes-*`), which
        // the validator ignores; the structural parts (pruning, defaults, transition rules) are
        // done here.
        let validator = jsonschema::draft4::new(&schema).map_err(|e| format!("HelmChart CRD schema: {e}"))?;
        Ok(CrdSchema { schema, validator, immutable })
    }

    pub(super) fn causes(&self, old: Option<&Value>, obj: &Value) -> Vec<Cause> {
        let mut causes: Vec<Cause> = self.validator.iter_errors(obj).map(|e| schema_cause(&e)).collect();
        for (path, message) in &self.immutable {
            if let Some(before) = old.and_then(|o| get_path(o, path))
                && get_path(obj, path) != Some(before)
            {
                let field = dotted(path).trim_start_matches('.').to_string();
                let kind = json_type_name(get_path(obj, path).unwrap_or(&Value::Null));
                causes.push(Cause {
                    reason: "FieldValueInvalid",
                    message: format!("Invalid value: \"{kind}\": {message}"),
                    field,
                });
            }
        }
        causes
    }
}

pub(super) fn collect_immutable(schema: &Value, path: &mut Vec<String>, out: &mut Vec<(FieldPath, String)>) {
    if let Some(rules) = schema.get("x-kubernetes-validations").and_then(Value::as_array) {
        for rule in rules {
            let text = rule.get("rule").and_then(Value::as_str).unwrap_or("");
            let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
            if compact == "!oldSelf.hasValue()||self==oldSelf.value()" || compact == "self==oldSelf" {
                let message = rule.get("message").and_then(Value::as_str).unwrap_or("Value is immutable");
                out.push((path.clone(), message.to_string()));
            }
        }
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, child) in props {
            path.push(k.clone());
            collect_immutable(child, path, out);
            path.pop();
        }
    }
}

pub(super) fn schema_cause(err: &jsonschema::ValidationError<'_>) -> Cause {
    use jsonschema::error::{TypeKind, ValidationErrorKind};
    let field = pointer_to_field(err.instance_path().as_str());
    let instance: &Value = err.instance();
    match err.kind() {
        ValidationErrorKind::Type { kind } => {
            let expected = match kind {
                TypeKind::Single(t) => t.to_string(),
                TypeKind::Multiple(set) => format!("{set:?}"),
            };
            let actual = json_type_name(instance);
            Cause {
                reason: "FieldValueTypeInvalid",
                message: format!(
                    "Invalid value: \"{actual}\": {field} in body must be of type {expected}: \"{actual}\""
                ),
                field,
            }
        }
        ValidationErrorKind::Enum { options } => {
            let supported: Vec<String> =
                options.as_array().map(|o| o.iter().map(Value::to_string).collect()).unwrap_or_default();
            Cause {
                reason: "FieldValueNotSupported",
                message: format!("Unsupported value: {instance}: supported values: {}", supported.join(", ")),
                field,
            }
        }
        ValidationErrorKind::Required { property } => {
            let name = property.as_str().map(str::to_string).unwrap_or_else(|| property.to_string());
            let field = if field.is_empty() { name } else { format!("{field}.{name}") };
            Cause { reason: "FieldValueRequired", message: "Required value".into(), field }
        }
        _ => Cause { reason: "FieldValueInvalid", message: format!("Invalid value: {instance}: {err}"), field },
    }
}

/// `/spec/valuesSecrets/0/name` -> `spec.valuesSecrets[0].name`.
pub(super) fn pointer_to_field(pointer: &str) -> String {
    let mut out = String::new();
    for segment in pointer.split('/').skip(1) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&segment);
        }
    }
    out
}

pub(super) fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Drops fields the schema does not declare (what the API server does to custom resources),
/// collecting their paths.
pub(super) fn prune_unknown(schema: &Value, v: &mut Value, path: &str, unknown: &mut Vec<String>) {
    let preserve = schema.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
    let join = |k: &str| if path.is_empty() { k.to_string() } else { format!("{path}.{k}") };
    match v {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let extra = schema.get("additionalProperties").filter(|e| e.is_object());
            if props.is_none() && extra.is_none() {
                return; // `type: object` alone, or preserve-unknown-fields: anything goes
            }
            let keys: Vec<String> = map.keys().cloned().collect();
            for k in keys {
                let child_schema = props.and_then(|p| p.get(&k)).or(extra);
                match (child_schema, map.get_mut(&k)) {
                    (Some(s), Some(child)) => prune_unknown(s, child, &join(&k), unknown),
                    (None, _) if preserve => {}
                    (None, _) => {
                        unknown.push(join(&k));
                        map.remove(&k);
                    }
                    _ => {}
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    prune_unknown(item_schema, item, &format!("{path}[{i}]"), unknown);
                }
            }
        }
        _ => {}
    }
}

/// Fills in the schema's `default`s under objects that are present.
pub(super) fn schema_defaults(schema: &Value, v: &mut Value) {
    match v {
        Value::Object(map) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, s) in props {
                    if !map.contains_key(k)
                        && let Some(default) = s.get("default")
                    {
                        map.insert(k.clone(), default.clone());
                    }
                    if let Some(child) = map.get_mut(k) {
                        schema_defaults(s, child);
                    }
                }
            } else if let Some(extra) = schema.get("additionalProperties").filter(|e| e.is_object()) {
                map.values_mut().for_each(|child| schema_defaults(extra, child));
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                items.iter_mut().for_each(|item| schema_defaults(item_schema, item));
            }
        }
        _ => {}
    }
}

impl State {
    pub(super) fn crd(&self) -> Result<Arc<CrdSchema>, ApiError> {
        self.crd.clone().map_err(|m| {
            ApiError::new(
                500,
                "InternalError",
                format!("Internal error occurred: the fake API server has no HelmChart CRD: {m}"),
            )
        })
    }

    /// Drops undeclared fields of custom resources with a schema, as `fieldValidation` says.
    pub(super) fn prune(&mut self, def: &ResourceDef, obj: &mut Value, fv: FieldValidation) -> Result<(), ApiError> {
        if !def.is_helmchart() {
            return Ok(());
        }
        let crd = self.crd()?;
        let mut unknown = Vec::new();
        prune_unknown(&crd.schema, obj, "", &mut unknown);
        let texts: Vec<String> = unknown.iter().map(|u| format!("unknown field \"{u}\"")).collect();
        match fv {
            _ if texts.is_empty() => Ok(()),
            FieldValidation::Strict => {
                Err(ApiError::bad_request(format!("strict decoding error: {}", texts.join(", "))))
            }
            FieldValidation::Warn => {
                self.warnings.extend(texts);
                Ok(())
            }
            FieldValidation::Ignore => Ok(()),
        }
    }

    pub(super) fn apply_defaults(&self, def: &ResourceDef, obj: &mut Value) {
        if def.is_helmchart()
            && let Ok(crd) = &self.crd
        {
            schema_defaults(&crd.schema, obj);
        }
    }

    pub(super) fn validate(&self, def: &ResourceDef, old: Option<&Value>, obj: &Value) -> Result<(), ApiError> {
        let name = meta_str(obj, "name").unwrap_or("");
        let mut causes = Vec::new();
        let name_check = if def.is_namespace() || def.plural == "services" {
            dns_label(name)
        } else if def.group == "rbac.authorization.k8s.io" {
            // RBAC objects take any path segment (`system:controller:...`).
            path_segment_name(name)
        } else {
            dns_subdomain(name)
        };
        if let Err(m) = name_check {
            causes.push(Cause {
                reason: "FieldValueInvalid",
                message: format!("Invalid value: {name:?}: {m}"),
                field: "metadata.name".into(),
            });
        }
        for (field, values_are_labels) in [("labels", true), ("annotations", false)] {
            let Some(map) = obj.pointer(&format!("/metadata/{field}")) else { continue };
            let Some(map) = map.as_object() else {
                return Err(ApiError::bad_request(format!(
                    "json: cannot unmarshal {} into Go struct field ObjectMeta.metadata.{field} of type map[string]string",
                    json_type_name(map)
                )));
            };
            for (k, v) in map {
                let Some(v) = v.as_str() else {
                    return Err(ApiError::bad_request(format!(
                        "json: cannot unmarshal {} into Go struct field ObjectMeta.metadata.{field} of type string",
                        json_type_name(v)
                    )));
                };
                if let Err(m) = qualified_name(k) {
                    causes.push(Cause {
                        reason: "FieldValueInvalid",
                        message: format!("Invalid value: {k:?}: {m}"),
                        field: format!("metadata.{field}"),
                    });
                }
                if values_are_labels && let Err(m) = label_value(v) {
                    causes.push(Cause {
                        reason: "FieldValueInvalid",
                        message: format!("Invalid value: {v:?}: {m}"),
                        field: format!("metadata.{field}"),
                    });
                }
            }
        }
        for (i, f) in finalizers(obj).iter().enumerate() {
            if let Err(m) = qualified_name(f) {
                causes.push(Cause {
                    reason: "FieldValueInvalid",
                    message: format!("Invalid value: {f:?}: {m}"),
                    field: format!("metadata.finalizers[{i}]"),
                });
            }
        }
        if def.group.is_empty() && def.plural == "nodes" {
            causes.extend(taint_causes(obj));
        }
        if def.is_helmchart() {
            causes.extend(self.crd()?.causes(old, obj));
        }
        if causes.is_empty() { Ok(()) } else { Err(ApiError::invalid(def, name, causes)) }
    }
}

pub(super) fn taint_causes(node: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let Some(taints) = node.pointer("/spec/taints").and_then(Value::as_array) else { return causes };
    let mut seen = BTreeSet::new();
    for (i, taint) in taints.iter().enumerate() {
        let field = |f: &str| format!("spec.taints[{i}].{f}");
        let key = taint.get("key").and_then(Value::as_str).unwrap_or("");
        let value = taint.get("value").and_then(Value::as_str).unwrap_or("");
        let effect = taint.get("effect").and_then(Value::as_str).unwrap_or("");
        if let Err(m) = qualified_name(key) {
            causes.push(Cause {
                reason: "FieldValueInvalid",
                message: format!("Invalid value: {key:?}: {m}"),
                field: field("key"),
            });
        }
        if let Err(m) = label_value(value) {
            causes.push(Cause {
                reason: "FieldValueInvalid",
                message: format!("Invalid value: {value:?}: {m}"),
                field: field("value"),
            });
        }
        if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
            causes.push(Cause {
                reason: "FieldValueNotSupported",
                message: format!(
                    "Unsupported value: {effect:?}: supported values: \"NoSchedule\", \"PreferNoSchedule\", \
                     \"NoExecute\""
                ),
                field: field("effect"),
            });
        }
        if !seen.insert((key.to_string(), effect.to_string())) {
            causes.push(Cause {
                reason: "FieldValueDuplicate",
                message: format!("Duplicate value: {taint}: taints must be unique by key and effect pair"),
                field: format!("spec.taints[{i}]"),
            });
        }
    }
    causes
}

pub(super) const DNS_LABEL_HELP: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and \
     must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is \
     '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
pub(super) const DNS_SUBDOMAIN_HELP: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' \
     or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is \
     '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
pub(super) const NAME_PART_HELP: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end \
     with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is \
     '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
pub(super) const LABEL_VALUE_HELP: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or \
     '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex \
     used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";

pub(super) fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

pub(super) fn dns_label(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err("must be no more than 63 characters".into());
    }
    if is_dns_label(s) { Ok(()) } else { Err(DNS_LABEL_HELP.into()) }
}

pub(super) fn dns_subdomain(s: &str) -> Result<(), String> {
    if s.len() > 253 {
        return Err("must be no more than 253 characters".into());
    }
    if !s.is_empty() && s.split('.').all(is_dns_label) { Ok(()) } else { Err(DNS_SUBDOMAIN_HELP.into()) }
}

/// The API server's `ValidatePathSegmentName`: not `.` or `..`, and no `/` or `%`.
pub(super) fn path_segment_name(s: &str) -> Result<(), String> {
    match s {
        "" => Err("name or generateName is required".into()),
        "." | ".." => Err(format!("may not be '{s}'")),
        _ if s.contains('/') => Err("may not contain '/'".into()),
        _ if s.contains('%') => Err("may not contain '%'".into()),
        _ => Ok(()),
    }
}

pub(super) fn is_name_part(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// A label or annotation key, or a finalizer: `[prefix/]name`.
pub(super) fn qualified_name(s: &str) -> Result<(), String> {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() {
            return Err("prefix part must be non-empty".into());
        }
        dns_subdomain(prefix).map_err(|m| format!("prefix part {m}"))?;
    }
    if name.is_empty() {
        return Err("name part must be non-empty".into());
    }
    if name.len() > 63 {
        return Err("name part must be no more than 63 characters".into());
    }
    if is_name_part(name) { Ok(()) } else { Err(NAME_PART_HELP.into()) }
}

pub(super) fn label_value(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err("must be no more than 63 characters".into());
    }
    if s.is_empty() || is_name_part(s) { Ok(()) } else { Err(LABEL_VALUE_HELP.into()) }
}

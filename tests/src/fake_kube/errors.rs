//! Errors as the API server writes them: the `Status` envelope with its reasons and causes.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::apply::dotted;
use super::store::{FieldPath, ManagerEntry};
use super::types::{ResourceDef, Verb};

#[derive(Debug, Clone)]
pub(super) struct ApiError {
    pub(super) code: u16,
    pub(super) reason: &'static str,
    pub(super) message: String,
    pub(super) details: Option<Value>,
    /// Answered as text, as the API server's mux does for paths it does not serve at all.
    pub(super) plain: bool,
}

#[derive(Debug, Clone)]
pub(super) struct Cause {
    pub(super) reason: &'static str,
    pub(super) message: String,
    pub(super) field: String,
}

impl ApiError {
    pub(super) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { code, reason, message: message.into(), details: None, plain: false }
    }

    pub(super) fn with_details(mut self, details: Value) -> ApiError {
        self.details = Some(details);
        self
    }

    pub(super) fn status_body(&self) -> Value {
        let mut body = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        });
        if let Some(details) = &self.details {
            body["details"] = details.clone();
        }
        body
    }

    pub(super) fn object_details(def: &ResourceDef, name: &str) -> Value {
        let mut d = json!({"name": name, "kind": def.plural});
        if !def.group.is_empty() {
            d["group"] = json!(def.group);
        }
        d
    }

    pub(super) fn page_not_found() -> ApiError {
        ApiError { plain: true, ..ApiError::new(404, "NotFound", "404 page not found") }
    }

    pub(super) fn no_such_resource() -> ApiError {
        ApiError::new(404, "NotFound", "the server could not find the requested resource").with_details(json!({}))
    }

    pub(super) fn not_found(def: &ResourceDef, name: &str) -> ApiError {
        ApiError::new(404, "NotFound", format!("{} \"{name}\" not found", def.group_resource()))
            .with_details(Self::object_details(def, name))
    }

    pub(super) fn namespace_not_found(namespace: &str) -> ApiError {
        ApiError::new(404, "NotFound", format!("namespaces \"{namespace}\" not found"))
            .with_details(json!({"name": namespace, "kind": "namespaces"}))
    }

    pub(super) fn already_exists(def: &ResourceDef, name: &str) -> ApiError {
        ApiError::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", def.group_resource()))
            .with_details(Self::object_details(def, name))
    }

    pub(super) fn modified(def: &ResourceDef, name: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your \
                 changes to the latest version and try again",
                def.group_resource()
            ),
        )
        .with_details(Self::object_details(def, name))
    }

    pub(super) fn precondition(def: &ResourceDef, name: &str, what: &str, wanted: &str, actual: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: {what} in precondition: {wanted}, \
                 {what} in object meta: {actual}",
                def.group_resource()
            ),
        )
        .with_details(Self::object_details(def, name))
    }

    pub(super) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    pub(super) fn invalid(def: &ResourceDef, name: &str, causes: Vec<Cause>) -> ApiError {
        Self::invalid_kind(&def.group_kind(), &def.group, &def.kind, name, causes)
    }

    pub(super) fn invalid_kind(group_kind: &str, group: &str, kind: &str, name: &str, causes: Vec<Cause>) -> ApiError {
        let list: Vec<String> = causes.iter().map(|c| format!("{}: {}", c.field, c.message)).collect();
        let joined = if list.len() == 1 { list[0].clone() } else { format!("[{}]", list.join(", ")) };
        let mut details = json!({
            "name": name, "kind": kind,
            "causes": causes.iter().map(|c| json!({"reason": c.reason, "message": c.message,
                "field": c.field})).collect::<Vec<_>>(),
        });
        if !group.is_empty() {
            details["group"] = json!(group);
        }
        ApiError::new(422, "Invalid", format!("{group_kind} \"{name}\" is invalid: {joined}")).with_details(details)
    }

    pub(super) fn terminating(def: &ResourceDef, name: &str, namespace: &str) -> ApiError {
        let mut details = Self::object_details(def, name);
        details["causes"] = json!([{
            "reason": "NamespaceTerminating",
            "message": format!("namespace {namespace} is being terminated"),
            "field": "metadata.namespace",
        }]);
        ApiError::new(
            403,
            "Forbidden",
            format!(
                "{} \"{name}\" is forbidden: unable to create new content in namespace {namespace} because it is being \
                 terminated",
                def.group_resource()
            ),
        )
        .with_details(details)
    }

    /// The error a programmed fault answers with.
    pub(super) fn injected(
        code: u16,
        verb: Verb,
        def: &ResourceDef,
        namespace: Option<&str>,
        name: &str,
        message: Option<&str>,
    ) -> ApiError {
        let gr = def.group_resource();
        let target = if name.is_empty() { gr.clone() } else { format!("{gr} \"{name}\"") };
        let mut e = match code {
            400 => ApiError::bad_request(format!("the server rejected our request for an unknown reason ({target})")),
            401 => ApiError::new(401, "Unauthorized", "Unauthorized"),
            403 => {
                let scope = match namespace {
                    Some(ns) => format!("in the namespace \"{ns}\""),
                    None => "at the cluster scope".to_string(),
                };
                ApiError::new(
                    403,
                    "Forbidden",
                    format!(
                        "{target} is forbidden: User \"system:serviceaccount:kube-system:hexa-coordinator\" cannot {} \
                         resource \"{}\" in API group \"{}\" {scope}",
                        verb.as_str(),
                        def.plural,
                        def.group
                    ),
                )
                .with_details(Self::object_details(def, name))
            }
            404 => ApiError::not_found(def, name),
            409 if verb == Verb::Create => ApiError::already_exists(def, name),
            409 => ApiError::modified(def, name),
            410 => ApiError::new(410, "Expired", "too old resource version"),
            422 => ApiError::invalid(
                def,
                name,
                vec![Cause {
                    reason: "FieldValueInvalid",
                    message: "Invalid value: injected fault".into(),
                    field: "spec".into(),
                }],
            ),
            429 => ApiError::new(
                429,
                "TooManyRequests",
                "the server has received too many requests and has asked us to try again later",
            )
            .with_details(json!({"retryAfterSeconds": 1})),
            503 => ApiError::new(503, "ServiceUnavailable", "the server is currently unable to handle the request"),
            504 => ApiError::new(
                504,
                "Timeout",
                "the server was unable to return a response in the time allotted, but may still be processing the request",
            ),
            _ => ApiError::new(code, "InternalError", "Internal error occurred: injected fault")
                .with_details(json!({"causes": [{"message": "injected fault"}]})),
        };
        if let Some(m) = message {
            e.message = m.to_string();
        }
        e
    }
}

pub(super) fn method_not_allowed() -> ApiError {
    ApiError::new(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
}

pub(super) fn unsupported_media_type() -> ApiError {
    ApiError::new(
        415,
        "UnsupportedMediaType",
        "the body of the request was in an unknown format - accepted media types include: \
         application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
    )
}

pub(super) fn patch_options_invalid(field: &str, reason: &'static str, message: &str) -> ApiError {
    ApiError::invalid_kind(
        "PatchOptions.meta.k8s.io",
        "meta.k8s.io",
        "PatchOptions",
        "",
        vec![Cause { reason, message: message.to_string(), field: field.to_string() }],
    )
}

pub(super) fn conflict_error(managers: &[ManagerEntry], conflicts: &[(usize, FieldPath)]) -> ApiError {
    let mut by_manager: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (i, p) in conflicts {
        by_manager.entry(*i).or_default().push(dotted(p));
    }
    let mut parts = Vec::new();
    let mut causes = Vec::new();
    for (i, paths) in &by_manager {
        let e = &managers[*i];
        let with = format!("\"{}\" using {}", e.manager, e.api_version);
        if paths.len() == 1 {
            parts.push(format!("conflict with {with}: {}", paths[0]));
        } else {
            parts.push(format!("conflicts with {with}:\n- {}", paths.join("\n- ")));
        }
        for p in paths {
            causes.push(
                json!({"reason": "FieldManagerConflict", "message": format!("conflict with {with}"), "field": p}),
            );
        }
    }
    let n = conflicts.len();
    let plural = if n == 1 { "conflict" } else { "conflicts" };
    ApiError::new(409, "Conflict", format!("Apply failed with {n} {plural}: {}", parts.join("\n")))
        .with_details(json!({"causes": causes}))
}

impl ApiError {
    /// What every request gets while [`FakeKube::fail_all`] is set.
    pub(super) fn server_wide(code: u16) -> ApiError {
        match code {
            401 => ApiError::new(401, "Unauthorized", "Unauthorized"),
            403 => ApiError::new(403, "Forbidden", "forbidden: User \"system:anonymous\" cannot get path \"/\""),
            429 => ApiError::new(
                429,
                "TooManyRequests",
                "the server has received too many requests and has asked us to try again later",
            ),
            503 => ApiError::new(503, "ServiceUnavailable", "the server is currently unable to handle the request"),
            504 => ApiError::new(504, "Timeout", "the server was unable to return a response in the time allotted"),
            _ => ApiError::new(code, "InternalError", "Internal error occurred: injected fault")
                .with_details(json!({"causes": [{"message": "injected fault"}]})),
        }
    }
}

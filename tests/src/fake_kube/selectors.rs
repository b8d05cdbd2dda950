//! Label and field selectors, and list continuation tokens.

use serde_json::Value;

use super::apply::meta_str;
use super::errors::ApiError;
use super::http::Req;
use super::validation::qualified_name;

#[derive(Debug, Clone)]
pub(super) enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Debug, Clone, Default)]
pub(super) struct Selector {
    pub(super) labels: Vec<LabelReq>,
    /// (field, equal, value)
    pub(super) fields: Vec<(String, bool, String)>,
}

impl Selector {
    pub(super) fn parse(req: &Req) -> Result<Selector, ApiError> {
        let labels = parse_label_selector(req.q("labelSelector").unwrap_or(""))
            .map_err(|m| ApiError::bad_request(format!("unable to parse requirement: {m}")))?;
        let fields = parse_field_selector(req.q("fieldSelector").unwrap_or("")).map_err(ApiError::bad_request)?;
        Ok(Selector { labels, fields })
    }

    pub(super) fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match r {
            LabelReq::Eq(k, v) => label(k) == Some(v),
            LabelReq::NotEq(k, v) => label(k) != Some(v),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
        });
        let fields_ok = self.fields.iter().all(|(field, eq, value)| {
            let actual = match field.as_str() {
                "metadata.name" => meta_str(obj, "name").unwrap_or(""),
                _ => meta_str(obj, "namespace").unwrap_or(""),
            };
            (actual == value) == *eq
        });
        labels_ok && fields_ok
    }
}

pub(super) fn parse_label_selector(s: &str) -> Result<Vec<LabelReq>, String> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    let mut reqs = Vec::new();
    for part in parts.into_iter().map(str::trim).filter(|p| !p.is_empty()) {
        let key_ok = |k: &str| qualified_name(k).map(|_| k.to_string()).map_err(|m| format!("{k:?}: {m}"));
        let req = if let Some(k) = part.strip_prefix('!') {
            LabelReq::NotExists(key_ok(k.trim())?)
        } else if let Some(open) = part.find('(') {
            let close = part.rfind(')').ok_or_else(|| format!("{part:?}: missing ')'"))?;
            let values: Vec<String> =
                part[open + 1..close].split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect();
            let head = part[..open].trim();
            if let Some(k) = head.strip_suffix("notin") {
                LabelReq::NotIn(key_ok(k.trim())?, values)
            } else if let Some(k) = head.strip_suffix("in") {
                LabelReq::In(key_ok(k.trim())?, values)
            } else {
                return Err(format!("{part:?}: unknown operator"));
            }
        } else if let Some((k, v)) = part.split_once("!=") {
            LabelReq::NotEq(key_ok(k.trim())?, v.trim().to_string())
        } else if let Some((k, v)) = part.split_once("==") {
            LabelReq::Eq(key_ok(k.trim())?, v.trim().to_string())
        } else if let Some((k, v)) = part.split_once('=') {
            LabelReq::Eq(key_ok(k.trim())?, v.trim().to_string())
        } else {
            LabelReq::Exists(key_ok(part)?)
        };
        reqs.push(req);
    }
    Ok(reqs)
}

pub(super) fn parse_field_selector(s: &str) -> Result<Vec<(String, bool, String)>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (field, eq, value) = if let Some((f, v)) = part.split_once("!=") {
            (f, false, v)
        } else if let Some((f, v)) = part.split_once("==") {
            (f, true, v)
        } else if let Some((f, v)) = part.split_once('=') {
            (f, true, v)
        } else {
            return Err(format!("invalid selector: '{part}'; can't understand '{part}'"));
        };
        let field = field.trim();
        if field != "metadata.name" && field != "metadata.namespace" {
            return Err(format!("field label not supported: {field}"));
        }
        out.push((field.to_string(), eq, value.trim().to_string()));
    }
    Ok(out)
}

pub(super) fn encode_continue(namespace: &str, name: &str) -> String {
    format!("{namespace}\u{0}{name}").bytes().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn decode_continue(token: &str) -> Option<(String, String)> {
    if token.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> =
        (0..token.len()).step_by(2).map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok()).collect();
    let text = String::from_utf8(bytes?).ok()?;
    let (ns, name) = text.split_once('\u{0}')?;
    Some((ns.to_string(), name.to_string()))
}

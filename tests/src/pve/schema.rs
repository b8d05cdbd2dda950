//! Parameter checking as PVE's `PVE::JSONSchema` does it, against the API schema of
//! `../shared/reference/proxmox-ve/PVE-schema.json`: an unknown parameter, a missing required
//! one or a value of the wrong type is a 400 with one message per parameter in `errors`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use base64::Engine;
use serde_json::Value;

/// Where the schema lives, relative to the tests crate.
const SCHEMA: &str = "../../shared/reference/proxmox-ve/PVE-schema.json";

/// One endpoint: its path template split in segments, and per method its parameter schema.
#[derive(Debug)]
struct Endpoint {
    segments: Vec<String>,
    methods: BTreeMap<String, Value>,
}

#[derive(Debug)]
pub struct Schema {
    endpoints: Vec<Endpoint>,
}

pub fn schema() -> &'static Schema {
    static SCHEMA_INDEX: OnceLock<Schema> = OnceLock::new();
    SCHEMA_INDEX.get_or_init(|| {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(SCHEMA);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let tree: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut endpoints = Vec::new();
        fn walk(nodes: &Value, out: &mut Vec<Endpoint>) {
            for node in nodes.as_array().into_iter().flatten() {
                if let Some(path) = node["path"].as_str() {
                    let methods = node["info"]
                        .as_object()
                        .map(|m| m.iter().map(|(k, v)| (k.clone(), v["parameters"].clone())).collect())
                        .unwrap_or_default();
                    let segments = path.trim_matches('/').split('/').map(String::from).collect();
                    out.push(Endpoint { segments, methods });
                }
                walk(&node["children"], out);
            }
        }
        walk(&tree, &mut endpoints);
        Schema { endpoints }
    })
}

/// What matching a request against the schema found.
#[derive(Debug, PartialEq)]
pub enum Matched {
    /// The template (`/nodes/{node}/qemu/{vmid}/clone`) and the path's parameters.
    Ok {
        template: String,
        path_params: BTreeMap<String, String>,
    },
    NoPath,
    NoMethod,
}

impl Schema {
    pub fn find(&self, method: &str, path: &str) -> Matched {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let mut path_found = false;
        for endpoint in &self.endpoints {
            if endpoint.segments.len() != parts.len() {
                continue;
            }
            let mut params = BTreeMap::new();
            let fits = endpoint.segments.iter().zip(&parts).all(|(seg, part)| {
                if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    params.insert(name.to_string(), part.to_string());
                    true
                } else {
                    seg == part
                }
            });
            if !fits {
                continue;
            }
            path_found = true;
            if endpoint.methods.contains_key(method) {
                return Matched::Ok { template: format!("/{}", endpoint.segments.join("/")), path_params: params };
            }
        }
        if path_found { Matched::NoMethod } else { Matched::NoPath }
    }

    fn parameters(&self, method: &str, template: &str) -> Option<&Value> {
        let segments: Vec<&str> = template.trim_matches('/').split('/').collect();
        self.endpoints.iter().find(|e| e.segments == segments).and_then(|e| e.methods.get(method))
    }

    /// Checks `params` (path parameters included) against the method's schema; the errors as PVE
    /// words them, by parameter.
    pub fn check(&self, method: &str, template: &str, params: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut errors = BTreeMap::new();
        let Some(schema) = self.parameters(method, template) else { return errors };
        let props = schema["properties"].as_object().cloned().unwrap_or_default();
        let additional = schema["additionalProperties"].as_i64().unwrap_or(1) != 0
            || schema["additionalProperties"].as_bool() == Some(true);
        for (name, value) in params {
            let prop = props.get(name).or_else(|| indexed(&props, name));
            match prop {
                Some(prop) => {
                    if let Err(e) = check_value(prop, value) {
                        errors.insert(name.clone(), e);
                    }
                }
                None if !additional => {
                    errors.insert(
                        name.clone(),
                        "property is not defined in schema and the schema does not allow additional properties".into(),
                    );
                }
                None => {}
            }
        }
        for (name, prop) in &props {
            let optional = prop["optional"].as_i64() == Some(1) || prop["optional"].as_bool() == Some(true);
            if !optional && !name.contains("[n]") && !params.contains_key(name) {
                errors.insert(name.clone(), "property is missing and it is not optional".into());
            }
        }
        errors
    }
}

/// `net0` is described as `net[n]`.
fn indexed<'a>(props: &'a serde_json::Map<String, Value>, name: &str) -> Option<&'a Value> {
    let base = name.trim_end_matches(|c: char| c.is_ascii_digit());
    if base.len() == name.len() {
        return None;
    }
    props.get(&format!("{base}[n]"))
}

fn check_value(prop: &Value, value: &str) -> Result<(), String> {
    match prop["type"].as_str().unwrap_or("string") {
        "integer" => {
            let n: i64 = value
                .parse()
                .ok()
                .filter(|_| value.bytes().all(|b| b.is_ascii_digit() || b == b'-'))
                .ok_or_else(|| format!("type check ('integer') failed - got '{value}'"))?;
            let format_min = if prop["format"] == "pve-vmid" { Some(100) } else { None };
            if let Some(min) = prop["minimum"].as_i64().or(format_min).filter(|m| n < *m) {
                return Err(format!("value must have a minimum value of {min}"));
            }
            if let Some(max) = prop["maximum"].as_i64().filter(|m| n > *m) {
                return Err(format!("value must have a maximum value of {max}"));
            }
            Ok(())
        }
        "number" => {
            value.parse::<f64>().map(|_| ()).map_err(|_| format!("type check ('number') failed - got '{value}'"))
        }
        "boolean" => match value.to_ascii_lowercase().as_str() {
            "0" | "1" | "true" | "false" | "yes" | "no" | "on" | "off" => Ok(()),
            _ => Err(format!("type check ('boolean') failed - got '{value}'")),
        },
        _ => {
            if let Some(values) = prop["enum"].as_array() {
                let names: Vec<&str> = values.iter().filter_map(|v| v.as_str()).collect();
                if !names.contains(&value) {
                    return Err(format!(
                        "value '{value}' does not have a value in the enumeration '{}'",
                        names.join(", ")
                    ));
                }
            }
            if let Some(max) = prop["maxLength"].as_u64().filter(|m| value.len() as u64 > *m) {
                return Err(format!("value may only be {max} characters long"));
            }
            match prop["format"].as_str() {
                Some("pve-tag-list") => {
                    for tag in value.split([';', ',', ' ']).filter(|t| !t.is_empty()) {
                        let ok = tag.bytes().enumerate().all(|(i, b)| {
                            b.is_ascii_alphanumeric() || b == b'_' || (i > 0 && matches!(b, b'-' | b'+' | b'.'))
                        });
                        if !ok {
                            return Err(format!("invalid format - invalid characters in tag '{tag}'"));
                        }
                    }
                    Ok(())
                }
                Some("pve-qm-smbios1") => check_smbios1(value),
                Some("dns-name") | Some("pve-node") => {
                    let ok = !value.is_empty()
                        && value.split('.').all(|l| {
                            !l.is_empty()
                                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                                && !l.starts_with('-')
                        });
                    if ok { Ok(()) } else { Err(format!("value does not look like a valid DNS name: '{value}'")) }
                }
                _ => Ok(()),
            }
        }
    }
}

/// `uuid=<UUID>,serial=<base64>,base64=1` and friends.
fn check_smbios1(value: &str) -> Result<(), String> {
    let mut base64 = false;
    let mut encoded = Vec::new();
    for part in value.split(',') {
        let (key, v) = part.split_once('=').ok_or_else(|| format!("invalid format - missing value for '{part}'"))?;
        match key {
            "base64" => base64 = v == "1",
            "uuid" => {
                let ok = v.len() == 36
                    && v.bytes()
                        .enumerate()
                        .all(|(i, b)| if [8, 13, 18, 23].contains(&i) { b == b'-' } else { b.is_ascii_hexdigit() });
                if !ok {
                    return Err(format!("invalid format - value '{v}' does not look like a valid UUID"));
                }
            }
            "family" | "manufacturer" | "product" | "serial" | "sku" | "version" => encoded.push(v),
            _ => return Err(format!("invalid format - unknown property '{key}'")),
        }
    }
    if base64 {
        for v in encoded {
            base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|_| format!("invalid format - value '{v}' is not base64 encoded"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn clone_parameters_are_checked_as_pve_does() {
        let s = schema();
        let Matched::Ok { template, path_params } = s.find("POST", "/nodes/pve1/qemu/9000/clone") else { panic!() };
        assert_eq!(template, "/nodes/{node}/qemu/{vmid}/clone");
        let mut p = path_params.clone();
        p.extend(params(&[("newid", "105"), ("full", "1"), ("name", "hx-abc")]));
        assert!(s.check("POST", &template, &p).is_empty());
        let mut bad = path_params.clone();
        bad.extend(params(&[("newid", "abc"), ("full", "maybe"), ("colour", "red")]));
        let errors = s.check("POST", &template, &bad);
        assert_eq!(errors["newid"], "type check ('integer') failed - got 'abc'");
        assert_eq!(errors["full"], "type check ('boolean') failed - got 'maybe'");
        assert!(errors["colour"].contains("not defined in schema"));
        let missing = s.check("POST", &template, &path_params);
        assert_eq!(missing["newid"], "property is missing and it is not optional");
        assert_eq!(s.find("PATCH", "/nodes/pve1/qemu/9000/clone"), Matched::NoMethod);
        assert_eq!(s.find("GET", "/nodes/pve1/nothing"), Matched::NoPath);
    }

    #[test]
    fn config_values_are_checked_by_format() {
        let s = schema();
        let template = "/nodes/{node}/qemu/{vmid}/config";
        let base = params(&[("node", "pve1"), ("vmid", "105")]);
        let with = |extra: &[(&str, &str)]| {
            let mut p = base.clone();
            p.extend(params(extra));
            s.check("POST", template, &p)
        };
        assert!(with(&[("cores", "4"), ("net0", "virtio,bridge=vmbr0"), ("tags", "hexabase;hx-tenant-a")]).is_empty());
        assert!(with(&[("cores", "0")])["cores"].contains("minimum value of 1"));
        assert!(with(&[("tags", "bad tag!")])["tags"].contains("invalid characters"));
        assert!(with(&[("smbios1", "uuid=nope")])["smbios1"].contains("UUID"));
        assert!(with(&[("smbios1", "serial=%%%,base64=1")])["smbios1"].contains("base64"));
    }
}

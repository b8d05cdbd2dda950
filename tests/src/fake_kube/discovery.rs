//! Discovery: `/version`, the legacy group and resource documents, and aggregated discovery.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::http::Reply;
use super::store::State;
use super::types::ResourceDef;

pub(super) fn version_document() -> Value {
    json!({
        "major": "1", "minor": "33", "emulationMajor": "1", "emulationMinor": "33",
        "minCompatibilityMajor": "1", "minCompatibilityMinor": "32",
        "gitVersion": "v1.33.5+k3s1", "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean", "buildDate": "2025-09-10T00:00:00Z", "goVersion": "go1.24.6",
        "compiler": "gc", "platform": "linux/amd64",
    })
}

impl State {
    pub(super) fn served(&self) -> impl Iterator<Item = &ResourceDef> {
        self.resources.iter().filter(|(_, s)| *s).map(|(d, _)| d)
    }

    pub(super) fn versions_of(&self, group: &str) -> Vec<String> {
        let set: BTreeSet<String> = self.served().filter(|d| d.group == group).map(|d| d.version.clone()).collect();
        set.into_iter().collect()
    }

    pub(super) fn group_entry(&self, group: &str) -> Option<Value> {
        let versions = self.versions_of(group);
        let first = versions.first()?;
        Some(json!({
            "name": group,
            "versions": versions.iter().map(|v| json!({"groupVersion": format!("{group}/{v}"),
                "version": v})).collect::<Vec<_>>(),
            "preferredVersion": {"groupVersion": format!("{group}/{first}"), "version": first},
        }))
    }

    pub(super) fn group_list(&self) -> Value {
        let groups: BTreeSet<String> = self.served().filter(|d| !d.group.is_empty()).map(|d| d.group.clone()).collect();
        let entries: Vec<Value> = groups.iter().filter_map(|g| self.group_entry(g)).collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": entries})
    }

    pub(super) fn group_document(&self, group: &str) -> Option<Value> {
        let mut doc = self.group_entry(group)?;
        doc["kind"] = json!("APIGroup");
        doc["apiVersion"] = json!("v1");
        Some(doc)
    }

    pub(super) fn resource_list(&self, group: &str, version: &str) -> Option<Value> {
        let defs: Vec<&ResourceDef> = self.served().filter(|d| d.group == group && d.version == version).collect();
        if defs.is_empty() {
            return None;
        }
        let mut resources = Vec::new();
        for d in defs {
            let mut r = json!({"name": d.plural, "singularName": d.singular, "namespaced": d.namespaced, "kind": d.kind,
                "verbs": d.verbs()});
            if !d.short_names.is_empty() {
                r["shortNames"] = json!(d.short_names);
            }
            resources.push(r);
            if d.status_subresource {
                resources.push(
                    json!({"name": format!("{}/status", d.plural), "singularName": "", "namespaced": d.namespaced,
                                      "kind": d.kind, "verbs": ["get", "patch", "update"]}),
                );
            }
            if d.is_namespace() {
                resources.push(json!({"name": "namespaces/finalize", "singularName": "", "namespaced": false,
                                      "kind": "Namespace", "verbs": ["update"]}));
            }
        }
        let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
        Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}))
    }

    /// `apidiscovery.k8s.io/v2`: `/api` (core only) or `/apis` (every other group).
    pub(super) fn aggregated_discovery(&self, core: bool) -> Reply {
        let groups: BTreeSet<String> =
            self.served().filter(|d| d.group.is_empty() == core).map(|d| d.group.clone()).collect();
        let items: Vec<Value> = groups
            .iter()
            .map(|group| {
                let versions: Vec<Value> = self
                    .versions_of(group)
                    .iter()
                    .map(|version| {
                        let resources: Vec<Value> = self
                            .served()
                            .filter(|d| d.group == *group && d.version == *version)
                            .map(|d| {
                                let gvk = json!({"group": d.group, "version": d.version, "kind": d.kind});
                                let mut subresources = Vec::new();
                                if d.status_subresource {
                                    subresources.push(json!({"subresource": "status", "responseKind": gvk,
                                        "verbs": ["get", "patch", "update"]}));
                                }
                                json!({
                                    "resource": d.plural, "responseKind": gvk, "singularResource": d.singular,
                                    "scope": if d.namespaced { "Namespaced" } else { "Cluster" },
                                    "verbs": d.verbs(), "shortNames": d.short_names, "subresources": subresources,
                                })
                            })
                            .collect();
                        json!({"version": version, "freshness": "Current", "resources": resources})
                    })
                    .collect();
                json!({"metadata": {"name": group}, "versions": versions})
            })
            .collect();
        Reply::Json {
            code: 200,
            body: json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {},
                "items": items}),
            content_type: Some("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"),
        }
    }
}

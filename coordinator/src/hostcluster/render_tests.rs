use super::*;

use std::collections::BTreeMap;

use hexa_shared::names::tenant_namespace;
use hexa_shared::quantity::{parse_bytes, parse_cpu_millis};
use hexa_shared::tenant::{DedicatedPlan, NodeClass, Phase, Placement, Plan, Share, SharedPlan, Tenant};
use serde_json::{Value, json};

/// The upstream reference data, in `shared/` beside the repository.
const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/reference");
const VALUES_SCHEMA: &str = "vcluster-0.36.1/values.schema.json";
const HELMCHART_CRD: &str = "helm-controller/helm.cattle.io_helmcharts.yaml";

fn read_reference(relative: &str) -> String {
    let path = format!("{REFERENCE}/{relative}");
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("cannot read {path}: {e}; the reference data lives in shared/ beside the repository")
    })
}

/// The pinned chart's values schema (draft 2020-12, `additionalProperties: false` throughout).
fn values_validator() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(&read_reference(VALUES_SCHEMA)).unwrap();
    assert_eq!(schema["$schema"], "https://json-schema.org/draft/2020-12/schema", "the chart schema changed draft");
    jsonschema::draft202012::new(&schema).unwrap()
}

/// Makes every object schema that lists its properties refuse others, unless it preserves unknown
/// fields: what the API server's strict field validation does with a structural CRD schema (plain
/// JSON Schema would let unknown fields through, and the API server would silently prune them).
fn strict(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let preserves = map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
            if map.contains_key("properties") && !map.contains_key("additionalProperties") && !preserves {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            map.values_mut().for_each(strict);
        }
        Value::Array(items) => items.iter_mut().for_each(strict),
        _ => {}
    }
}

/// The HelmChart CRD's `spec.versions[0].schema.openAPIV3Schema`, made strict.
fn helm_chart_validator() -> jsonschema::Validator {
    let crd: Value = serde_norway::from_str(&read_reference(HELMCHART_CRD)).unwrap();
    assert_eq!(crd["spec"]["names"]["kind"], "HelmChart");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1");
    let mut schema = version["schema"]["openAPIV3Schema"].clone();
    assert!(schema.is_object(), "the CRD has no openAPIV3Schema");
    strict(&mut schema);
    // OpenAPI 3.0 schema objects are a superset of JSON Schema draft 4.
    jsonschema::draft4::new(&schema).unwrap()
}

fn errors(validator: &jsonschema::Validator, document: &Value) -> Vec<String> {
    validator.iter_errors(document).map(|e| format!("{}: {e}", e.instance_path())).collect()
}

// --- fixtures ---------------------------------------------------------------------------------

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn tenant(name: &str, plan: Plan, placement: Placement) -> Tenant {
    Tenant { name: name.into(), plan, phase: Phase::Deploying, conditions: Vec::new(), placement }
}

fn shares(plan: &SharedPlan, nodes: &[&str]) -> Vec<Share> {
    nodes
        .iter()
        .enumerate()
        .map(|(i, node)| Share {
            index: i as u32,
            node: node.to_string(),
            size: plan.share_size(),
            control_plane: i < usize::from(plan.replicas),
        })
        .collect()
}

fn shared_tenant(name: &str, plan: SharedPlan, nodes: &[&str]) -> Tenant {
    tenant(name, Plan::Shared(plan), Placement { shares: shares(&plan, nodes), ..Placement::default() })
}

/// A single control plane, 2 CPU / 4 GiB / 40 pods over two shared nodes.
fn acme() -> Tenant {
    let plan = SharedPlan { cpu_millis: 2000, memory_bytes: 4 * GIB, pods: 40, replicas: 1, spread: 2 };
    shared_tenant("acme", plan, &["shared-1", "shared-2"])
}

/// A highly available control plane: 3 replicas, 6 CPU / 12 GiB / 60 pods over three shared nodes.
fn globex() -> Tenant {
    let plan = SharedPlan { cpu_millis: 6000, memory_bytes: 12 * GIB, pods: 60, replicas: 3, spread: 3 };
    shared_tenant("globex", plan, &["shared-1", "shared-2", "shared-3"])
}

/// Two dedicated nodes of class M (8 CPU, 32 GiB each).
fn initech() -> Tenant {
    tenant(
        "initech",
        Plan::Dedicated(DedicatedPlan { node_class: "M".into(), count: 2 }),
        Placement { dedicated_nodes: vec!["dedicated-1".into(), "dedicated-2".into()], ..Placement::default() },
    )
}

/// Moving from a shared plan to one dedicated L node: the share still serves until the node is bound.
fn hooli() -> Tenant {
    let old = SharedPlan { cpu_millis: 1000, memory_bytes: 2 * GIB, pods: 20, replicas: 1, spread: 1 };
    tenant(
        "hooli",
        Plan::Dedicated(DedicatedPlan { node_class: "L".into(), count: 1 }),
        Placement {
            shares: shares(&old, &["shared-3"]),
            dedicated_nodes: vec!["dedicated-3".into()],
            awaiting_nodes: 0,
        },
    )
}

fn classes() -> Vec<NodeClass> {
    NodeClass::defaults()
}

fn settings_variants() -> Vec<(&'static str, RenderSettings)> {
    let default = RenderSettings::default();
    vec![
        ("default", default.clone()),
        ("restricted", RenderSettings { pod_security: PodSecurityLevel::Restricted, ..default.clone() }),
        ("privileged", RenderSettings { pod_security: PodSecurityLevel::Privileged, ..default.clone() }),
        ("embedded etcd", RenderSettings { ha_backing_store: HaBackingStore::EmbeddedEtcd, ..default.clone() }),
        ("reinstall", RenderSettings { failure_policy: FailurePolicy::Reinstall, ..default }),
    ]
}

fn all_tenants() -> Vec<Tenant> {
    let tiny = SharedPlan { cpu_millis: 100, memory_bytes: 128 * MIB, pods: 1, replicas: 1, spread: 1 };
    let tiny_ha = SharedPlan { cpu_millis: 300, memory_bytes: 384 * MIB, pods: 3, replicas: 3, spread: 3 };
    let odd = SharedPlan { cpu_millis: 2500, memory_bytes: 3 * GIB + 12345, pods: 7, replicas: 1, spread: 3 };
    vec![
        acme(),
        globex(),
        initech(),
        hooli(),
        shared_tenant("tiny", tiny, &["shared-1"]),
        shared_tenant("tiny-ha", tiny_ha, &["shared-1", "shared-2", "shared-3"]),
        shared_tenant("odd", odd, &["shared-1", "shared-2", "shared-3"]),
        // Placed nowhere yet: the objects do not depend on the placement.
        tenant("pending", Plan::Dedicated(DedicatedPlan { node_class: "S".into(), count: 3 }), Placement::default()),
    ]
}

fn values_json(tenant: &Tenant, settings: &RenderSettings) -> Value {
    serde_json::to_value(vcluster_values(tenant, &classes(), settings).unwrap()).unwrap()
}

fn manifests_text(tenant: &Tenant) -> String {
    manifests(tenant, &classes(), &RenderSettings::default())
        .unwrap()
        .into_iter()
        .map(|(path, text)| format!("=== {path}\n{text}"))
        .collect::<Vec<_>>()
        .join("\n")
}

// --- snapshots --------------------------------------------------------------------------------

#[test]
fn shared_tenant_manifests() {
    insta::assert_snapshot!("shared_tenant", manifests_text(&acme()));
}

#[test]
fn dedicated_tenant_manifests() {
    insta::assert_snapshot!("dedicated_tenant", manifests_text(&initech()));
}

#[test]
fn ha_tenant_manifests() {
    insta::assert_snapshot!("ha_tenant", manifests_text(&globex()));
}

#[test]
fn node_manifests_of_shared_ha_dedicated_and_moving_tenants() {
    let tenants = [acme(), globex(), initech(), hooli()];
    let marks = merge_node_marks(&tenants).unwrap();
    let text = node_manifests(&marks)
        .unwrap()
        .into_iter()
        .map(|(path, text)| format!("=== {path}\n{text}"))
        .collect::<Vec<_>>()
        .join("\n");
    insta::assert_snapshot!("node_manifests", text);
}

// --- schemas ----------------------------------------------------------------------------------

#[test]
fn every_values_document_validates_against_the_chart_schema() {
    let validator = values_validator();
    for (variant, settings) in settings_variants() {
        for tenant in all_tenants() {
            let values = values_json(&tenant, &settings);
            let errs = errors(&validator, &values);
            assert!(
                errs.is_empty(),
                "{} ({variant}): values break the chart schema:\n{}",
                tenant.name,
                errs.join("\n")
            );
            // What the HelmChart carries is the same document.
            let chart = helm_chart(&tenant, &classes(), &settings).unwrap();
            let carried: Value = serde_norway::from_str(chart.spec.values_content.as_deref().unwrap()).unwrap();
            assert_eq!(carried, values, "{} ({variant}): valuesContent differs from the values", tenant.name);
        }
    }
}

#[test]
fn every_helm_chart_validates_against_the_crd_schema() {
    let validator = helm_chart_validator();
    for (variant, settings) in settings_variants() {
        for tenant in all_tenants() {
            let chart = serde_json::to_value(helm_chart(&tenant, &classes(), &settings).unwrap()).unwrap();
            let errs = errors(&validator, &chart);
            assert!(
                errs.is_empty(),
                "{} ({variant}): HelmChart breaks the CRD schema:\n{}",
                tenant.name,
                errs.join("\n")
            );
            assert_eq!(chart["apiVersion"], "helm.cattle.io/v1");
            assert_eq!(chart["kind"], "HelmChart");
            assert_eq!(chart["metadata"]["namespace"], "kube-system");
            assert_eq!(chart["spec"]["targetNamespace"], format!("hx-{}", tenant.name));
            assert_eq!(chart["spec"]["createNamespace"], false);
        }
    }
}

/// Changes `document` at a JSON pointer (creating the parent's entry if missing).
fn with(document: &Value, parent: &str, key: &str, value: Value) -> Value {
    let mut doc = document.clone();
    let target = doc.pointer_mut(parent).unwrap_or_else(|| panic!("no {parent} in the document"));
    target.as_object_mut().unwrap().insert(key.into(), value);
    doc
}

#[test]
fn schema_validation_has_teeth() {
    let values_schema = values_validator();
    let values = values_json(&globex(), &RenderSettings::default());
    assert!(errors(&values_schema, &values).is_empty());
    let broken_values = [
        ("unknown top-level key", with(&values, "", "tenant", json!("globex"))),
        ("unknown nested key", with(&values, "/controlPlane/statefulSet", "nodeSelector", json!({}))),
        ("replicas as a string", with(&values, "/controlPlane/statefulSet/highAvailability", "replicas", json!("3"))),
        ("label value not a string", with(&values, "/sync/fromHost/nodes/selector/labels", "x", json!(true))),
        ("enforceTolerations not strings", with(&values, "/sync/toHost/pods", "enforceTolerations", json!([{}]))),
        ("quota switch a number", with(&values, "/policies/resourceQuota", "enabled", json!(1))),
        ("networkPolicy switch a string", with(&values, "/policies/networkPolicy", "enabled", json!("true"))),
        ("pod security standard not a string", with(&values, "/policies", "podSecurityStandard", json!(true))),
    ];
    for (what, document) in broken_values {
        assert!(!errors(&values_schema, &document).is_empty(), "the chart schema accepted values with {what}");
    }

    let crd_schema = helm_chart_validator();
    let chart = serde_json::to_value(helm_chart(&globex(), &classes(), &RenderSettings::default()).unwrap()).unwrap();
    assert!(errors(&crd_schema, &chart).is_empty());
    let broken_charts = [
        ("unknown spec field", with(&chart, "/spec", "values_content", json!("a: 1"))),
        ("createNamespace as a string", with(&chart, "/spec", "createNamespace", json!("false"))),
        ("valuesContent as an object", with(&chart, "/spec", "valuesContent", json!({"a": 1}))),
        ("failurePolicy outside the enum", with(&chart, "/spec", "failurePolicy", json!("retry"))),
        ("backOffLimit as a string", with(&chart, "/spec", "backOffLimit", json!("3"))),
    ];
    for (what, document) in broken_charts {
        assert!(!errors(&crd_schema, &document).is_empty(), "the CRD schema accepted a HelmChart with {what}");
    }
}

// --- behaviour --------------------------------------------------------------------------------

#[test]
fn quota_is_the_plan() {
    let settings = RenderSettings::default();
    let table: &[(Tenant, &str, &str, &str)] = &[
        (acme(), "2", "4Gi", "40"),
        (globex(), "6", "12Gi", "60"),
        // Class M (8 CPU, 32 GiB) times two nodes, 110 pods a node.
        (initech(), "16", "64Gi", "220"),
        // The target plan counts, not the share still being left.
        (hooli(), "16", "64Gi", "110"),
    ];
    for (tenant, cpu, memory, pods) in table {
        let values = values_json(tenant, &settings);
        let quota = &values["policies"]["resourceQuota"];
        assert_eq!(quota["enabled"], true, "{}", tenant.name);
        assert_eq!(
            quota["quota"],
            json!({"requests.cpu": cpu, "requests.memory": memory, "count/pods": pods, "limits.cpu": null, "limits.memory": null}),
            "{}",
            tenant.name
        );
        assert_eq!(values["policies"]["limitRange"]["enabled"], true);
        assert_eq!(values["policies"]["networkPolicy"]["enabled"], true);
        assert_eq!(values["policies"]["podSecurityStandard"], "baseline");
    }
    let dedicated = RenderSettings { dedicated_pods_per_node: 250, ..settings };
    assert_eq!(values_json(&initech(), &dedicated)["policies"]["resourceQuota"]["quota"]["count/pods"], "500");
}

#[test]
fn control_plane_and_workloads_are_pinned_to_the_tenants_nodes() {
    let settings = RenderSettings::default();
    for tenant in all_tenants() {
        let values = values_json(&tenant, &settings);
        let label = json!({ format!("tenant.hexabase.ai/{}", tenant.name): "true" });
        let dedicated = matches!(tenant.plan, Plan::Dedicated(_));
        let replicas = match &tenant.plan {
            Plan::Shared(plan) => u64::from(plan.replicas),
            Plan::Dedicated(_) => 1,
        };
        let statefulset = &values["controlPlane"]["statefulSet"];
        assert_eq!(statefulset["scheduling"]["nodeSelector"], label, "{}", tenant.name);
        assert_eq!(statefulset["highAvailability"]["replicas"], replicas, "{}", tenant.name);
        let nodes = &values["sync"]["fromHost"]["nodes"];
        assert_eq!(nodes["enabled"], true);
        assert_eq!(nodes["selector"]["labels"], label, "{}", tenant.name);
        assert_eq!(nodes["selector"]["all"], false, "all: true would sync every node of the host");

        let toleration =
            json!({"key": "hexabase.ai/dedicated", "operator": "Equal", "value": tenant.name, "effect": "NoSchedule"});
        let enforced = &values["sync"]["toHost"]["pods"]["enforceTolerations"];
        if dedicated {
            assert_eq!(statefulset["scheduling"]["tolerations"], json!([toleration]), "{}", tenant.name);
            assert_eq!(*enforced, json!([format!("hexabase.ai/dedicated={}:NoSchedule", tenant.name)]));
        } else {
            assert_eq!(statefulset["scheduling"]["tolerations"], json!([]), "{}", tenant.name);
            assert_eq!(*enforced, json!([]), "{}", tenant.name);
        }

        let backing_store = &values["controlPlane"]["backingStore"];
        if replicas == 3 {
            // Replicas on distinct nodes; the chart refuses SQLite with more than one replica.
            let spread = &statefulset["scheduling"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                [0];
            assert_eq!(spread["topologyKey"], "kubernetes.io/hostname");
            assert_eq!(spread["labelSelector"]["matchLabels"], statefulset["pods"]["labels"]);
            let etcd = &backing_store["etcd"]["deploy"];
            assert_eq!(etcd["enabled"], true, "{}", tenant.name);
            assert_eq!(etcd["statefulSet"]["highAvailability"]["replicas"], 3);
            assert_eq!(etcd["statefulSet"]["scheduling"]["nodeSelector"], label);
            assert_eq!(etcd["statefulSet"]["scheduling"]["tolerations"], statefulset["scheduling"]["tolerations"]);
            assert_ne!(etcd["statefulSet"]["pods"]["labels"], statefulset["pods"]["labels"]);
        } else {
            assert!(backing_store.is_null(), "{}: one replica keeps the chart's default store", tenant.name);
            assert!(statefulset["scheduling"].get("affinity").is_none());
        }
    }
    let embedded = RenderSettings { ha_backing_store: HaBackingStore::EmbeddedEtcd, ..settings };
    assert_eq!(
        values_json(&globex(), &embedded)["controlPlane"]["backingStore"],
        json!({"etcd": {"embedded": {"enabled": true}}})
    );
}

fn cpu(value: &Value) -> u64 {
    parse_cpu_millis(value.as_str().unwrap_or_else(|| panic!("{value} is not a quantity"))).unwrap()
}

fn bytes(value: &Value) -> u64 {
    parse_bytes(value.as_str().unwrap_or_else(|| panic!("{value} is not a quantity"))).unwrap()
}

#[test]
fn control_plane_requests_leave_the_tenant_at_least_half_of_its_quota() {
    let settings = RenderSettings::default();
    for tenant in all_tenants() {
        let values = values_json(&tenant, &settings);
        let quota = &values["policies"]["resourceQuota"]["quota"];
        let (quota_cpu, quota_memory) = (cpu(&quota["requests.cpu"]), bytes(&quota["requests.memory"]));
        let mut components = vec![&values["controlPlane"]["statefulSet"]];
        if let Some(etcd) = values["controlPlane"]["backingStore"]["etcd"]["deploy"].get("statefulSet") {
            components.push(etcd);
        }
        let (mut used_cpu, mut used_memory) = (0, 0);
        for component in components {
            let replicas = component["highAvailability"]["replicas"].as_u64().unwrap();
            let resources = &component["resources"];
            let (request_cpu, request_memory) =
                (cpu(&resources["requests"]["cpu"]), bytes(&resources["requests"]["memory"]));
            let limit_memory = bytes(&resources["limits"]["memory"]);
            assert!(request_cpu >= 1 && request_memory >= MIB, "{}: requests nothing", tenant.name);
            assert!(limit_memory >= request_memory, "{}: limit below request", tenant.name);
            used_cpu += replicas * request_cpu;
            used_memory += replicas * request_memory;
        }
        // Rounding up to one millicore / one MiB is the only excess allowed.
        assert!(
            used_cpu <= (quota_cpu / 2).max(3),
            "{}: control plane requests {used_cpu}m of {quota_cpu}m",
            tenant.name
        );
        assert!(
            used_memory <= (quota_memory / 2).max(3 * MIB),
            "{}: control plane requests {used_memory} of {quota_memory}",
            tenant.name
        );
    }
    // A large plan gets the configured sizes as they are.
    let resources = &values_json(&initech(), &settings)["controlPlane"]["statefulSet"]["resources"];
    assert_eq!(*resources, json!({"requests": {"cpu": "200m", "memory": "256Mi"}, "limits": {"memory": "2Gi"}}));
}

#[test]
fn limit_range_defaults_never_exceed_one_share_or_node() {
    let settings = RenderSettings::default();
    let acme_share = match &acme().plan {
        Plan::Shared(plan) => plan.share_size(),
        Plan::Dedicated(_) => unreachable!(),
    };
    let limit_range = &values_json(&acme(), &settings)["policies"]["limitRange"];
    assert_eq!(cpu(&limit_range["default"]["cpu"]), acme_share.cpu_millis);
    assert_eq!(limit_range["default"]["memory"], "512Mi");
    assert_eq!(limit_range["defaultRequest"], json!({"cpu": "100m", "memory": "128Mi"}));
    let tiny = &values_json(&all_tenants()[4], &settings)["policies"]["limitRange"];
    assert_eq!(tiny["default"], json!({"cpu": "100m", "memory": "128Mi"}));
    assert_eq!(tiny["defaultRequest"], json!({"cpu": "100m", "memory": "128Mi"}));
    let dedicated = &values_json(&initech(), &settings)["policies"]["limitRange"];
    assert_eq!(dedicated["default"], json!({"cpu": "8", "memory": "512Mi"}));
}

#[test]
fn node_marks_label_share_nodes_and_taint_dedicated_nodes() {
    let marks = node_marks(&hooli());
    let shared = &marks["shared-3"];
    assert_eq!(
        shared.labels,
        BTreeMap::from([
            ("hexabase.ai/pool".into(), "shared".into()),
            ("tenant.hexabase.ai/hooli".into(), "true".into())
        ])
    );
    assert!(shared.taints.is_empty());
    let dedicated = &marks["dedicated-3"];
    assert_eq!(dedicated.labels["hexabase.ai/pool"], "dedicated");
    assert_eq!(dedicated.labels["tenant.hexabase.ai/hooli"], "true");
    assert_eq!(
        dedicated.taints.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["hexabase.ai/dedicated=hooli:NoSchedule"]
    );
    assert_eq!(marks.len(), 2);
    assert!(node_marks(&all_tenants()[7]).is_empty(), "a tenant placed nowhere marks no node");
    for (key, managed) in
        [("hexabase.ai/pool", true), ("tenant.hexabase.ai/acme", true), ("kubernetes.io/hostname", false)]
    {
        assert_eq!(is_managed_label(key), managed, "{key}");
    }
    assert!(is_managed_taint("hexabase.ai/dedicated") && !is_managed_taint("node.kubernetes.io/unschedulable"));

    // Two tenants on one shared node: both labels.
    let merged = merge_node_marks(&[acme(), globex()]).unwrap();
    assert_eq!(merged["shared-1"].labels.len(), 3);
    assert_eq!(merged["shared-3"].labels.keys().collect::<Vec<_>>(), ["hexabase.ai/pool", "tenant.hexabase.ai/globex"]);

    // A node both shared and dedicated, or dedicated twice, is a placement bug reported by name.
    let mut intruder = initech();
    intruder.name = "intruder".into();
    intruder.placement.dedicated_nodes = vec!["shared-1".into()];
    let err = merge_node_marks(&[acme(), intruder.clone()]).unwrap_err().to_string();
    assert!(err.contains("node shared-1 is claimed twice: a share of acme and dedicated to intruder"), "{err}");
    intruder.placement.dedicated_nodes = vec!["dedicated-2".into()];
    let err = merge_node_marks(&[initech(), intruder]).unwrap_err().to_string();
    assert!(err.contains("node dedicated-2 is claimed twice: dedicated to initech and dedicated to intruder"), "{err}");
}

#[test]
fn namespace_carries_the_tenant_and_pod_security_labels() {
    let table = [
        (PodSecurityLevel::Baseline, "baseline", "baseline"),
        (PodSecurityLevel::Privileged, "privileged", "privileged"),
        // The vCluster control plane runs as root in this namespace: restricted is enforced inside
        // the vCluster, and only audited and warned about on the host.
        (PodSecurityLevel::Restricted, "baseline", "restricted"),
    ];
    for (level, enforce, audit_warn) in table {
        let settings =
            RenderSettings { pod_security: level, pod_security_version: "v1.33".into(), ..RenderSettings::default() };
        let ns = serde_json::to_value(namespace(&acme(), &settings)).unwrap();
        assert_eq!(
            ns,
            json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": "hx-acme", "labels": {
                    "app.kubernetes.io/managed-by": "hexa-coordinator",
                    "hexabase.ai/tenant": "acme",
                    "pod-security.kubernetes.io/enforce": enforce,
                    "pod-security.kubernetes.io/enforce-version": "v1.33",
                    "pod-security.kubernetes.io/audit": audit_warn,
                    "pod-security.kubernetes.io/audit-version": "v1.33",
                    "pod-security.kubernetes.io/warn": audit_warn,
                    "pod-security.kubernetes.io/warn-version": "v1.33",
                }},
            }),
            "{level:?}"
        );
        assert_eq!(values_json(&acme(), &settings)["policies"]["podSecurityStandard"], level.as_str());
    }
}

#[test]
fn settings_come_from_the_hostcluster_table_with_defaults() {
    #[derive(Deserialize)]
    struct Config {
        hostcluster: RenderSettings,
    }
    let config: Config = toml::from_str(
        r#"
        [hostcluster]
        chart_version = "0.36.2"
        pod_security = "restricted"
        [hostcluster.etcd]
        cpu_request_millis = 50
        memory_request_bytes = 268435456
        memory_limit_bytes = 1073741824
        "#,
    )
    .unwrap();
    let defaults = RenderSettings::default();
    assert_eq!(defaults.chart_repo, "https://charts.loft.sh");
    assert_eq!(defaults.chart_version, "0.36.1");
    assert_eq!(defaults.pod_security, PodSecurityLevel::Baseline);
    assert_eq!(config.hostcluster.chart_version, "0.36.2");
    assert_eq!(config.hostcluster.pod_security, PodSecurityLevel::Restricted);
    assert_eq!(config.hostcluster.etcd.cpu_request_millis, 50);
    assert_eq!(config.hostcluster.chart_repo, defaults.chart_repo);
    assert_eq!(config.hostcluster.control_plane, defaults.control_plane);
    assert_eq!(config.hostcluster.validate(), Ok(()));
    assert_eq!(defaults.validate(), Ok(()));

    // Typos and half tables are refused rather than ignored.
    assert!(toml::from_str::<Config>("[hostcluster]\nchart_versoin = \"1\"").is_err());
    assert!(toml::from_str::<Config>("[hostcluster]\npod_security = \"strict\"").is_err());
    assert!(toml::from_str::<Config>("[hostcluster.etcd]\ncpu_request_millis = 50").is_err());

    let table = [
        (RenderSettings { chart_repo: "charts.loft.sh".into(), ..defaults.clone() }, "write https://... or oci://..."),
        (RenderSettings { chart_version: String::new(), ..defaults.clone() }, "pin one, e.g. 0.36.1"),
        (RenderSettings { pod_security_version: "1.33".into(), ..defaults.clone() }, "write latest or v1.<minor>"),
        (
            RenderSettings {
                control_plane: ComponentResources { memory_limit_bytes: MIB, ..defaults.control_plane },
                ..defaults.clone()
            },
            "hostcluster.control_plane.memory_limit_bytes (1048576) is below memory_request_bytes",
        ),
        (RenderSettings { dedicated_pods_per_node: 0, ..defaults.clone() }, "dedicated_pods_per_node is 0"),
    ];
    for (settings, expected) in table {
        let err = settings.validate().unwrap_err().to_string();
        assert!(err.contains(expected), "got {err:?}, expected {expected:?}");
    }
}

#[test]
fn names_fit_kubernetes_and_helm_limits() {
    let longest = "a".repeat(hexa_shared::names::MAX_TENANT_NAME);
    // A namespace is a DNS label (63); a Helm release name is at most 53 characters.
    assert!(tenant_namespace(&longest).len() <= 63);
    assert!(release_name(&longest).len() <= 53);
    assert_eq!(tenant_namespace("acme"), "hx-acme");
    assert_eq!(release_name("acme"), "vcluster-acme");
}

#[test]
fn an_unknown_node_class_is_refused_with_the_known_ones() {
    let mut tenant = initech();
    tenant.plan = Plan::Dedicated(DedicatedPlan { node_class: "XL".into(), count: 1 });
    let err = helm_chart(&tenant, &classes(), &RenderSettings::default()).unwrap_err().to_string();
    assert_eq!(err, "cannot render tenant initech: unknown node class XL: known classes are S, M and L");
    assert!(manifests(&tenant, &classes(), &RenderSettings::default()).is_err());
}

#[test]
fn manifests_are_yaml_files_of_the_applied_objects() {
    let settings = RenderSettings::default();
    let files = manifests(&initech(), &classes(), &settings).unwrap();
    let names: Vec<&str> = files.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["tenants/initech/namespace.yaml", "tenants/initech/helmchart.yaml"]);
    let parsed: Vec<Value> = files.iter().map(|(_, text)| serde_norway::from_str(text).unwrap()).collect();
    assert_eq!(parsed[0], serde_json::to_value(namespace(&initech(), &settings)).unwrap());
    assert_eq!(parsed[1], serde_json::to_value(helm_chart(&initech(), &classes(), &settings).unwrap()).unwrap());
    assert!(files.iter().all(|(_, text)| text.starts_with("# Rendered by hexa-coordinator for tenant initech")));

    let marks = merge_node_marks(&[acme(), initech()]).unwrap();
    let nodes = node_manifests(&marks).unwrap();
    let names: Vec<&str> = nodes.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        ["nodes/dedicated-1.yaml", "nodes/dedicated-2.yaml", "nodes/shared-1.yaml", "nodes/shared-2.yaml"]
    );
    let dedicated: Value = serde_norway::from_str(&nodes[0].1).unwrap();
    assert_eq!(
        dedicated["spec"]["taints"],
        json!([{"key": "hexabase.ai/dedicated", "value": "initech", "effect": "NoSchedule"}])
    );
    let shared: Value = serde_norway::from_str(&nodes[2].1).unwrap();
    assert!(shared.get("spec").is_none(), "a shared node gets no taint");
}

#[test]
fn helm_chart_type_has_the_crds_names_scope_and_spec_fields() {
    use kube::Resource;

    use crate::hostcluster::helmchart::{HelmChart, HelmChartSpec, HelmChartStatus, HelmChartValuesSecret};

    let crd: Value = serde_norway::from_str(&read_reference(HELMCHART_CRD)).unwrap();
    let resource = kube::core::ApiResource::erase::<HelmChart>(&());
    assert_eq!(resource.group, crd["spec"]["group"]);
    assert_eq!(resource.kind, crd["spec"]["names"]["kind"]);
    assert_eq!(resource.plural, crd["spec"]["names"]["plural"]);
    assert_eq!(resource.version, crd["spec"]["versions"][0]["name"]);
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(HelmChart::api_version(&()), "helm.cattle.io/v1");

    // Every field set: the serialised spec has exactly the CRD's spec properties, and validates.
    let spec = HelmChartSpec {
        chart: Some("vcluster".into()),
        repo: Some("https://charts.loft.sh".into()),
        version: Some("0.36.1".into()),
        target_namespace: Some("hx-acme".into()),
        create_namespace: Some(false),
        failure_policy: Some(FailurePolicy::Reinstall),
        values_content: Some("a: 1\n".into()),
        auth_pass_credentials: Some(false),
        auth_secret: Some(k8s_openapi::api::core::v1::LocalObjectReference { name: "auth".into() }),
        back_off_limit: Some(3),
        bootstrap: Some(false),
        chart_content: Some("H4sI".into()),
        docker_registry_secret: Some(k8s_openapi::api::core::v1::LocalObjectReference { name: "registry".into() }),
        driver: Some(crate::hostcluster::helmchart::HelmDriver::Configmap),
        helm_version: Some("v3".into()),
        insecure_skip_tls_verify: Some(false),
        job_image: Some("rancher/klipper-helm:v0.9.4".into()),
        plain_http: Some(false),
        pod_security_context: Some(k8s_openapi::api::core::v1::PodSecurityContext {
            run_as_non_root: Some(true),
            ..Default::default()
        }),
        repo_ca: Some("-----BEGIN CERTIFICATE-----".into()),
        repo_ca_config_map: Some(k8s_openapi::api::core::v1::LocalObjectReference { name: "ca".into() }),
        security_context: Some(k8s_openapi::api::core::v1::SecurityContext {
            read_only_root_filesystem: Some(true),
            ..Default::default()
        }),
        set: Some(BTreeMap::from([(
            "replicas".to_string(),
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1),
        )])),
        take_ownership: Some(false),
        timeout: Some("5m0s".into()),
        values: Some(json!({"a": {"b": 1}})),
        values_secrets: Some(vec![HelmChartValuesSecret {
            name: Some("values".into()),
            keys: Some(vec!["values.yaml".into()]),
            ignore_updates: Some(false),
        }]),
    };
    let mut chart = HelmChart::new("vcluster-acme", spec);
    chart.metadata.namespace = Some(HELM_CHART_NAMESPACE.into());
    chart.status = Some(HelmChartStatus { conditions: None, job_name: Some("helm-install-vcluster-acme".into()) });
    let document = serde_json::to_value(&chart).unwrap();
    let ours: Vec<&String> = document["spec"].as_object().unwrap().keys().collect();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let theirs: Vec<&String> = schema["properties"]["spec"]["properties"].as_object().unwrap().keys().collect();
    assert_eq!(ours, theirs);
    assert_eq!(errors(&helm_chart_validator(), &document), Vec::<String>::new());
    // And what is unset is left out, not written as null.
    let empty = serde_json::to_value(HelmChart::new("x", HelmChartSpec::default())).unwrap();
    assert_eq!(
        empty,
        json!({"apiVersion": "helm.cattle.io/v1", "kind": "HelmChart", "metadata": {"name": "x"}, "spec": {}})
    );
}

#[test]
fn a_node_patch_without_marks_names_only_the_node() {
    // Applied to a node that no longer holds a tenant, it releases every label and taint of ours.
    let patch = serde_json::to_value(node_patch("idle", &NodeMarks::default())).unwrap();
    assert_eq!(patch, json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "idle"}}));
    let marks = node_marks(&initech());
    let (node, marks) = marks.iter().next().unwrap();
    let patch = serde_json::to_value(node_patch(node, marks)).unwrap();
    assert_eq!(
        patch["spec"],
        json!({"taints": [{"key": "hexabase.ai/dedicated", "value": "initech", "effect": "NoSchedule"}]})
    );
    assert_eq!(patch["metadata"]["labels"]["tenant.hexabase.ai/initech"], "true");
}

use std::time::Instant;

use super::*;

const APPLY: &str = "application/apply-patch+yaml";
const MERGE: &str = "application/merge-patch+json";
const HC: &str = "/apis/helm.cattle.io/v1/namespaces/kube-system/helmcharts";

struct T {
    kube: FakeKube,
    http: reqwest::Client,
}

struct Answer {
    status: u16,
    body: Value,
    text: String,
    headers: reqwest::header::HeaderMap,
}

async fn setup() -> T {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kube = FakeKube::start().await;
    T { kube, http: reqwest::Client::builder().user_agent("hexa-test/0.1").build().unwrap() }
}

impl T {
    async fn call(&self, method: &str, path: &str, content_type: Option<&str>, body: Option<Value>) -> Answer {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method, format!("{}{path}", self.kube.url()));
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        if let Some(body) = body {
            req = req.body(serde_json::to_vec(&body).unwrap());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer { status, body, text, headers }
    }

    async fn get(&self, path: &str) -> Answer {
        self.call("GET", path, None, None).await
    }

    async fn post(&self, path: &str, body: Value) -> Answer {
        self.call("POST", path, Some("application/json"), Some(body)).await
    }

    async fn put(&self, path: &str, body: Value) -> Answer {
        self.call("PUT", path, Some("application/json"), Some(body)).await
    }

    async fn delete(&self, path: &str) -> Answer {
        self.call("DELETE", path, None, None).await
    }

    async fn apply(&self, path: &str, manager: &str, force: bool, body: Value) -> Answer {
        let force = if force { "&force=true" } else { "" };
        self.call("PATCH", &format!("{path}?fieldManager={manager}{force}"), Some(APPLY), Some(body)).await
    }
}

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn configmap(name: &str, data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data})
}

fn helmchart(name: &str, target: &str, replicas: u32) -> Value {
    json!({
        "apiVersion": "helm.cattle.io/v1", "kind": "HelmChart",
        "metadata": {"name": name, "namespace": "kube-system", "labels": {"hexabase.ai/tenant": name}},
        "spec": {
            "chart": "vcluster", "repo": "https://charts.loft.sh", "version": "0.36.1",
            "targetNamespace": target, "createNamespace": false,
            "valuesContent": format!("controlPlane:\n  statefulSet:\n    highAvailability:\n      replicas: {replicas}\n"),
        },
    })
}

fn rv(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap()
}

fn assert_status(a: &Answer, code: u16, reason: &str) {
    assert_eq!(a.status, code, "{}", a.text);
    assert_eq!(a.body["kind"], "Status", "{}", a.text);
    assert_eq!(a.body["apiVersion"], "v1");
    assert_eq!(a.body["status"], "Failure");
    assert_eq!(a.body["reason"], reason, "{}", a.text);
    assert_eq!(a.body["code"], code);
}

/// The managers that own `path` (a `.`-free list of keys) in the object's managedFields.
fn owners(obj: &Value, path: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for entry in obj["metadata"]["managedFields"].as_array().cloned().unwrap_or_default() {
        let mut node = &entry["fieldsV1"];
        for k in path {
            node = &node[format!("f:{k}")];
        }
        if !node.is_null() {
            out.push(format!("{}:{}", entry["manager"].as_str().unwrap(), entry["operation"].as_str().unwrap()));
        }
    }
    out
}

#[tokio::test]
async fn discovery_documents_describe_the_served_resources() {
    let t = setup().await;
    let api = t.get("/api").await;
    assert_eq!(api.body["kind"], "APIVersions");
    assert_eq!(api.body["versions"], json!(["v1"]));
    let core = t.get("/api/v1").await;
    assert_eq!(core.body["kind"], "APIResourceList");
    let names: Vec<&str> =
        core.body["resources"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    for name in ["namespaces", "namespaces/status", "namespaces/finalize", "nodes", "nodes/status", "configmaps"] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    let groups = t.get("/apis").await;
    let group_names: Vec<&str> =
        groups.body["groups"].as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap()).collect();
    for g in ["apps", "batch", "helm.cattle.io"] {
        assert!(group_names.contains(&g), "{g} missing from {group_names:?}");
    }
    let helm = t.get("/apis/helm.cattle.io/v1").await;
    let hc = helm.body["resources"].as_array().unwrap().iter().find(|r| r["name"] == "helmcharts").unwrap().clone();
    assert_eq!(hc["kind"], "HelmChart");
    assert_eq!(hc["namespaced"], true);
    assert_eq!(hc["shortNames"], json!(["hc"]));
    for path in ["/apis/apps/v1", "/apis/batch/v1", "/apis/helm.cattle.io", "/version"] {
        assert_eq!(t.get(path).await.status, 200, "{path}");
    }
    // Aggregated discovery, as `kube::Discovery::run_aggregated` asks for it.
    let resp = t
        .http
        .get(format!("{}/apis", t.kube.url()))
        .header("accept", "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json")
        .send()
        .await
        .unwrap();
    assert!(resp.headers()["content-type"].to_str().unwrap().contains("as=APIGroupDiscoveryList"));
    let list: Value = resp.json().await.unwrap();
    assert_eq!(list["kind"], "APIGroupDiscoveryList");
    let helm = list["items"].as_array().unwrap().iter().find(|g| g["metadata"]["name"] == "helm.cattle.io").unwrap();
    assert_eq!(helm["versions"][0]["resources"][0]["scope"], "Namespaced");
}

#[tokio::test]
async fn create_get_list_and_already_exists() {
    let t = setup().await;
    let created = t.post("/api/v1/namespaces", namespace("hx-a", json!({"tier": "gold"}))).await;
    assert_eq!(created.status, 201, "{}", created.text);
    let ns = &created.body;
    assert!(ns["metadata"]["uid"].as_str().is_some_and(|u| u.len() == 36));
    assert!(ns["metadata"]["creationTimestamp"].as_str().is_some_and(|c| c.ends_with('Z')));
    assert_eq!(ns["metadata"]["labels"]["kubernetes.io/metadata.name"], "hx-a");
    assert_eq!(ns["spec"]["finalizers"], json!(["kubernetes"]));
    assert_eq!(ns["status"]["phase"], "Active");
    assert_eq!(owners(ns, &["metadata", "labels", "tier"]), vec!["hexa-test:Update".to_string()]);

    let got = t.get("/api/v1/namespaces/hx-a").await;
    assert_eq!(got.body, created.body);

    let again = t.post("/api/v1/namespaces", namespace("hx-a", json!({}))).await;
    assert_status(&again, 409, "AlreadyExists");
    assert_eq!(again.body["message"], "namespaces \"hx-a\" already exists");
    assert_eq!(again.body["details"], json!({"name": "hx-a", "kind": "namespaces"}));

    t.post("/api/v1/namespaces", namespace("hx-b", json!({"tier": "silver"}))).await;
    let gold = t.get("/api/v1/namespaces?labelSelector=tier%3Dgold").await;
    assert_eq!(gold.body["kind"], "NamespaceList");
    let items = gold.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["metadata"]["name"], "hx-a");
    assert!(items[0].get("kind").is_none(), "typed lists leave kind out of their items");
    let tiered = t.get("/api/v1/namespaces?labelSelector=tier%20in%20(gold,silver),tier!=bronze").await;
    assert_eq!(tiered.body["items"].as_array().unwrap().len(), 2);
    let by_name = t.get("/api/v1/namespaces?fieldSelector=metadata.name%3Dhx-b").await;
    assert_eq!(by_name.body["items"][0]["metadata"]["name"], "hx-b");
    assert_eq!(by_name.body["items"].as_array().unwrap().len(), 1);
    let bad = t.get("/api/v1/namespaces?fieldSelector=spec.foo%3Dx").await;
    assert_status(&bad, 400, "BadRequest");

    // Namespaced objects need their namespace to exist.
    let orphan = t.post("/api/v1/namespaces/nowhere/configmaps", configmap("c", json!({}))).await;
    assert_status(&orphan, 404, "NotFound");
    assert_eq!(orphan.body["message"], "namespaces \"nowhere\" not found");
    let invalid = t.post("/api/v1/namespaces", namespace("Not_A_Label", json!({}))).await;
    assert_status(&invalid, 422, "Invalid");
    assert_eq!(invalid.body["details"]["causes"][0]["field"], "metadata.name");
}

#[tokio::test]
async fn list_pages_with_limit_and_continue() {
    let t = setup().await;
    for i in 0..5 {
        t.post("/api/v1/namespaces/default/configmaps", configmap(&format!("c{i}"), json!({}))).await;
    }
    let mut names = Vec::new();
    let mut path = "/api/v1/namespaces/default/configmaps?limit=2".to_string();
    loop {
        let page = t.get(&path).await;
        names.extend(
            page.body["items"].as_array().unwrap().iter().map(|i| i["metadata"]["name"].as_str().unwrap().to_string()),
        );
        match page.body["metadata"]["continue"].as_str() {
            Some(token) => path = format!("/api/v1/namespaces/default/configmaps?limit=2&continue={token}"),
            None => break,
        }
    }
    assert_eq!(names, ["c0", "c1", "c2", "c3", "c4"]);
}

#[tokio::test]
async fn missing_objects_and_resources_answer_404_as_the_api_server_does() {
    let t = setup().await;
    let missing = t.get("/api/v1/namespaces/default/configmaps/nope").await;
    assert_status(&missing, 404, "NotFound");
    assert_eq!(missing.body["message"], "configmaps \"nope\" not found");
    let missing_hc = t.get(&format!("{HC}/nope")).await;
    assert_eq!(missing_hc.body["message"], "helmcharts.helm.cattle.io \"nope\" not found");
    assert_eq!(missing_hc.body["details"]["group"], "helm.cattle.io");
    let no_kind = t.get("/api/v1/namespaces/default/widgets").await;
    assert_status(&no_kind, 404, "NotFound");
    assert_eq!(no_kind.body["message"], "the server could not find the requested resource");
    let no_group = t.get("/apis/example.com/v1/namespaces/default/widgets").await;
    assert_eq!(no_group.status, 404);
    assert_eq!(no_group.text, "404 page not found\n");

    // A CRD that is not installed: the group disappears, and so does its discovery.
    assert!(t.kube.set_served("helmcharts.helm.cattle.io", false));
    t.kube.set_served("helmchartconfigs", false);
    let gone = t.get(HC).await;
    assert_eq!((gone.status, gone.text.as_str()), (404, "404 page not found\n"));
    assert!(!t.get("/apis").await.text.contains("helm.cattle.io"));
    t.kube.set_served("helmcharts", true);
    assert_eq!(t.get(HC).await.status, 200);

    // A registered custom resource is served like any other.
    t.kube.register_resource(ResourceDef::custom("example.com", "v1alpha1", "widgets", "Widget", true));
    let w = json!({"apiVersion": "example.com/v1alpha1", "kind": "Widget", "metadata": {"name": "w"},
            "spec": {"size": 3}});
    let created = t.apply("/apis/example.com/v1alpha1/namespaces/default/widgets/w", "tester", false, w).await;
    assert_eq!(created.status, 201, "{}", created.text);
    assert_eq!(t.kube.object("widgets", "default", "w").unwrap()["spec"]["size"], 3);
}

#[tokio::test]
async fn replace_with_a_stale_resource_version_conflicts() {
    let t = setup().await;
    let path = "/api/v1/namespaces/default/configmaps";
    let created = t.post(path, configmap("c", json!({"a": "1"}))).await.body;
    let mut update = created.clone();
    update["data"]["a"] = json!("2");
    let updated = t.put(&format!("{path}/c"), update.clone()).await;
    assert_eq!(updated.status, 200, "{}", updated.text);
    assert!(rv(&updated.body) > rv(&created));
    assert_eq!(updated.body["metadata"]["uid"], created["metadata"]["uid"]);

    // `update` still carries the first resourceVersion.
    update["data"]["a"] = json!("3");
    let stale = t.put(&format!("{path}/c"), update.clone()).await;
    assert_status(&stale, 409, "Conflict");
    assert_eq!(
        stale.body["message"],
        "Operation cannot be fulfilled on configmaps \"c\": the object has been modified; please apply your changes to \
             the latest version and try again"
    );
    // Without a resourceVersion the update is unconditional.
    update["metadata"].as_object_mut().unwrap().remove("resourceVersion");
    let forced = t.put(&format!("{path}/c"), update).await;
    assert_eq!(forced.status, 200);
    assert_eq!(forced.body["data"]["a"], "3");
    // Replacing something that does not exist is a 404, and names must match the URL.
    assert_status(&t.put(&format!("{path}/other"), configmap("other", json!({}))).await, 404, "NotFound");
    assert_status(&t.put(&format!("{path}/c"), configmap("d", json!({}))).await, 400, "BadRequest");
}

#[tokio::test]
async fn delete_with_finalizers_waits_until_they_are_removed() {
    let t = setup().await;
    let path = "/api/v1/namespaces/default/configmaps";
    let mut cm = configmap("held", json!({}));
    cm["metadata"]["finalizers"] = json!(["example.com/hold"]);
    t.post(path, cm).await;
    let deleted = t.delete(&format!("{path}/held")).await;
    assert_eq!(deleted.status, 200);
    assert!(deleted.body["metadata"]["deletionTimestamp"].is_string(), "{}", deleted.text);
    assert_eq!(t.get(&format!("{path}/held")).await.status, 200, "kept while the finalizer is there");
    // No new finalizers on an object being deleted.
    let more = t
        .call(
            "PATCH",
            &format!("{path}/held"),
            Some(MERGE),
            Some(json!({"metadata": {"finalizers": ["example.com/hold", "x/y"]}})),
        )
        .await;
    assert_status(&more, 422, "Invalid");
    let released =
        t.call("PATCH", &format!("{path}/held"), Some(MERGE), Some(json!({"metadata": {"finalizers": null}}))).await;
    assert_eq!(released.status, 200, "{}", released.text);
    assert_status(&t.get(&format!("{path}/held")).await, 404, "NotFound");

    // Without finalizers a built-in kind goes at once and the answer is a Success Status.
    t.post(path, configmap("plain", json!({}))).await;
    let gone = t.delete(&format!("{path}/plain")).await;
    assert_eq!(gone.body["status"], "Success");
    assert_eq!(gone.body["details"]["name"], "plain");
    assert_status(&t.delete(&format!("{path}/plain")).await, 404, "NotFound");
}

#[tokio::test]
async fn apply_sets_fields_and_a_dropped_field_is_removed() {
    let t = setup().await;
    let path = "/api/v1/namespaces/hx-a";
    let first = t.apply(path, "hexa-coordinator", false, namespace("hx-a", json!({"a": "1", "b": "2"}))).await;
    assert_eq!(first.status, 201, "{}", first.text);
    assert_eq!(owners(&first.body, &["metadata", "labels", "a"]), vec!["hexa-coordinator:Apply".to_string()]);
    let entry = &first.body["metadata"]["managedFields"][0];
    assert_eq!(entry["fieldsType"], "FieldsV1");
    assert_eq!(entry["apiVersion"], "v1");
    assert_eq!(entry["fieldsV1"], json!({"f:metadata": {"f:labels": {"f:a": {}, "f:b": {}}}}));

    let second = t.apply(path, "hexa-coordinator", false, namespace("hx-a", json!({"a": "1"}))).await;
    assert_eq!(second.status, 200);
    let labels = second.body["metadata"]["labels"].as_object().unwrap();
    assert!(!labels.contains_key("b"), "b was dropped from the applied config: {labels:?}");
    assert_eq!(labels["a"], "1");
    assert_eq!(labels["kubernetes.io/metadata.name"], "hx-a", "server-set label stays");
    assert!(rv(&second.body) > rv(&first.body));

    // Apply needs a field manager, and apiVersion/kind in the body.
    let no_manager = t.call("PATCH", path, Some(APPLY), Some(namespace("hx-a", json!({})))).await;
    assert_status(&no_manager, 422, "Invalid");
    assert_eq!(
        no_manager.body["message"],
        "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch"
    );
    let no_kind = t.apply(path, "hexa-coordinator", false, json!({"metadata": {"name": "hx-a"}})).await;
    assert_status(&no_kind, 400, "BadRequest");
}

#[tokio::test]
async fn apply_conflicts_with_another_manager_unless_forced() {
    let t = setup().await;
    let path = "/api/v1/namespaces/hx-a";
    t.apply(path, "other", false, namespace("hx-a", json!({"shared": "x", "theirs": "1"}))).await;
    let clash = t.apply(path, "hexa-coordinator", false, namespace("hx-a", json!({"theirs": "2"}))).await;
    assert_status(&clash, 409, "Conflict");
    assert_eq!(
        clash.body["message"],
        "Apply failed with 1 conflict: conflict with \"other\" using v1: .metadata.labels.theirs"
    );
    assert_eq!(
        clash.body["details"]["causes"],
        json!([{"reason": "FieldManagerConflict", "message": "conflict with \"other\" using v1",
                "field": ".metadata.labels.theirs"}])
    );
    assert_eq!(t.kube.object("namespaces", "", "hx-a").unwrap()["metadata"]["labels"]["theirs"], "1", "unchanged");

    // The same value is no conflict: the field becomes shared.
    let shared = t.apply(path, "hexa-coordinator", false, namespace("hx-a", json!({"shared": "x"}))).await;
    assert_eq!(shared.status, 200, "{}", shared.text);
    let mut both = owners(&shared.body, &["metadata", "labels", "shared"]);
    both.sort();
    assert_eq!(both, vec!["hexa-coordinator:Apply".to_string(), "other:Apply".to_string()]);
    // One owner dropping a shared field leaves it; the last one dropping it removes it.
    let dropped = t.apply(path, "hexa-coordinator", false, namespace("hx-a", json!({}))).await;
    assert_eq!(dropped.body["metadata"]["labels"]["shared"], "x");
    let dropped = t.apply(path, "other", false, namespace("hx-a", json!({"theirs": "1"}))).await;
    assert!(dropped.body["metadata"]["labels"].get("shared").is_none(), "{}", dropped.text);

    // Forcing takes the field over.
    let forced = t.apply(path, "hexa-coordinator", true, namespace("hx-a", json!({"theirs": "2"}))).await;
    assert_eq!(forced.status, 200, "{}", forced.text);
    assert_eq!(forced.body["metadata"]["labels"]["theirs"], "2");
    assert_eq!(owners(&forced.body, &["metadata", "labels", "theirs"]), vec!["hexa-coordinator:Apply".to_string()]);
    // ... and now the other manager is the one that conflicts.
    let back = t.apply(path, "other", false, namespace("hx-a", json!({"theirs": "1"}))).await;
    assert_status(&back, 409, "Conflict");
}

#[tokio::test]
async fn apply_conflicts_with_an_update_manager_and_lists_are_atomic() {
    let t = setup().await;
    // The K3s agent registered the node with a taint of its own (an Update operation).
    let mut node = json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n1", "labels": {"kubernetes.io/hostname": "n1"}},
                              "spec": {"taints": [{"key": "node.example.com/maintenance", "effect": "NoSchedule"}]}});
    t.kube.upsert("nodes", node.clone(), "k3s").unwrap();
    let ours = json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n1", "labels": {"hexabase.ai/pool": "dedicated"}},
                          "spec": {"taints": [{"key": "hexabase.ai/dedicated", "value": "acme",
                              "effect": "NoSchedule"}]}});
    let clash = t.apply("/api/v1/nodes/n1", "hexa-coordinator", false, ours.clone()).await;
    assert_status(&clash, 409, "Conflict");
    assert_eq!(clash.body["message"], "Apply failed with 1 conflict: conflict with \"k3s\" using v1: .spec.taints");
    // Labels are granular: the label alone applies cleanly next to the agent's.
    let mut labels_only = ours.clone();
    labels_only.as_object_mut().unwrap().remove("spec");
    let ok = t.apply("/api/v1/nodes/n1", "hexa-coordinator", false, labels_only).await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert_eq!(ok.body["metadata"]["labels"]["kubernetes.io/hostname"], "n1");
    // Forced, the whole list is replaced and owned by the applier.
    let forced = t.apply("/api/v1/nodes/n1", "hexa-coordinator", true, ours).await;
    assert_eq!(
        forced.body["spec"]["taints"],
        json!([{"key": "hexabase.ai/dedicated", "value": "acme", "effect": "NoSchedule"}])
    );
    assert_eq!(owners(&forced.body, &["spec", "taints"]), vec!["hexa-coordinator:Apply".to_string()]);
    // Bad taints are refused with the API server's causes.
    node["spec"]["taints"] = json!([{"key": "a", "effect": "Sometimes"}, {"key": "a", "effect": "Sometimes"}]);
    let bad = t.apply("/api/v1/nodes/n1", "hexa-coordinator", true, node).await;
    assert_status(&bad, 422, "Invalid");
    let fields: Vec<&str> =
        bad.body["details"]["causes"].as_array().unwrap().iter().map(|c| c["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["spec.taints[0].effect", "spec.taints[1].effect", "spec.taints[1]"]);
}

#[tokio::test]
async fn a_no_op_apply_is_not_a_write() {
    let t = setup().await;
    let path = "/api/v1/namespaces/hx-a";
    let body = namespace("hx-a", json!({"hexabase.ai/tenant": "a"}));
    let first = t.apply(path, "hexa-coordinator", false, body.clone()).await;
    let events_before = t.kube.resource_version();
    let again = t.apply(path, "hexa-coordinator", false, body.clone()).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body, first.body, "same object, same resourceVersion, same managedFields times");
    assert_eq!(t.kube.resource_version(), events_before);
    assert_eq!((t.kube.writes(), t.kube.changes()), (2, 1));
    let log = t.kube.requests();
    assert_eq!(log.iter().map(|r| r.changed).collect::<Vec<_>>(), [true, false]);
    assert_eq!(log[1].verb, Some(Verb::Patch));
    assert_eq!(log[1].resource, "namespaces");
    // Merge patches and PUTs that change nothing are no-ops too; dry runs never write.
    t.call("PATCH", path, Some(MERGE), Some(json!({"metadata": {"labels": {"hexabase.ai/tenant": "a"}}}))).await;
    let mut changed = body;
    changed["metadata"]["labels"]["x"] = json!("y");
    let dry =
        t.call("PATCH", &format!("{path}?fieldManager=hexa-coordinator&dryRun=All"), Some(APPLY), Some(changed)).await;
    assert_eq!(dry.body["metadata"]["labels"]["x"], "y");
    assert!(t.kube.object("namespaces", "", "hx-a").unwrap()["metadata"]["labels"].get("x").is_none());
    assert_eq!((t.kube.writes(), t.kube.changes()), (4, 1));
    t.kube.reset_counters();
    assert_eq!((t.kube.writes(), t.kube.changes(), t.kube.requests().len()), (0, 0, 0));
}

#[tokio::test]
async fn merge_patch_json_patch_and_strategic_patch() {
    let t = setup().await;
    t.kube.add_node("n1", &[("node-role.kubernetes.io/worker", "true")]).unwrap();
    let merged = t
        .call(
            "PATCH",
            "/api/v1/nodes/n1?fieldManager=labeler",
            Some(MERGE),
            Some(json!({"metadata": {"labels": {"pool": "shared"}}})),
        )
        .await;
    assert_eq!(merged.status, 200, "{}", merged.text);
    assert_eq!(merged.body["metadata"]["labels"]["pool"], "shared");
    assert_eq!(owners(&merged.body, &["metadata", "labels", "pool"]), vec!["labeler:Update".to_string()]);
    let patch = json!([
        {"op": "test", "path": "/metadata/labels/pool", "value": "shared"},
        {"op": "add", "path": "/spec/taints", "value": [{"key": "a", "effect": "NoSchedule"}]},
        {"op": "remove", "path": "/metadata/labels/pool"},
    ]);
    let patched = t.call("PATCH", "/api/v1/nodes/n1", Some("application/json-patch+json"), Some(patch)).await;
    assert_eq!(patched.status, 200, "{}", patched.text);
    assert!(patched.body["metadata"]["labels"].get("pool").is_none());
    assert_eq!(patched.body["spec"]["taints"][0]["key"], "a");
    let failed_test = json!([{"op": "test", "path": "/metadata/name", "value": "n2"}]);
    let refused = t.call("PATCH", "/api/v1/nodes/n1", Some("application/json-patch+json"), Some(failed_test)).await;
    assert_status(&refused, 422, "Invalid");
    // Custom resources do not take strategic merge patches.
    t.apply(&format!("{HC}/x"), "hexa-coordinator", false, helmchart("x", "kube-system", 1)).await;
    let strategic = t
        .call(
            "PATCH",
            &format!("{HC}/x"),
            Some("application/strategic-merge-patch+json"),
            Some(json!({"spec": {"version": "1"}})),
        )
        .await;
    assert_status(&strategic, 415, "UnsupportedMediaType");
    // A merge patch carrying a stale resourceVersion is a conflict.
    let stale =
        t.call("PATCH", "/api/v1/nodes/n1", Some(MERGE), Some(json!({"metadata": {"resourceVersion": "1"}}))).await;
    assert_status(&stale, 409, "Conflict");
}

#[tokio::test]
async fn status_subresource_is_written_apart_from_the_object() {
    let t = setup().await;
    let path = "/apis/apps/v1/namespaces/default/statefulsets";
    let sts = json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "s"},
                         "spec": {"replicas": 2}, "status": {"readyReplicas": 9}});
    let created = t.post(path, sts).await;
    assert!(created.body.get("status").is_none(), "status is not set through the main resource: {}", created.text);
    assert_eq!(created.body["metadata"]["generation"], 1);
    let body = json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "s"},
                          "status": {"readyReplicas": 2}, "spec": {"replicas": 7}});
    let status = t.apply(&format!("{path}/s/status"), "tester", false, body).await;
    assert_eq!(status.status, 200, "{}", status.text);
    assert_eq!(status.body["status"]["readyReplicas"], 2);
    assert_eq!(status.body["spec"]["replicas"], 2, "spec is not written through /status");
    assert_eq!(status.body["metadata"]["generation"], 1, "status changes do not bump generation");
    let scaled = t.call("PATCH", &format!("{path}/s"), Some(MERGE), Some(json!({"spec": {"replicas": 3}}))).await;
    assert_eq!(scaled.body["metadata"]["generation"], 2);
    let labelled =
        t.call("PATCH", &format!("{path}/s"), Some(MERGE), Some(json!({"metadata": {"labels": {"a": "b"}}}))).await;
    assert_eq!(labelled.body["metadata"]["generation"], 2, "metadata changes do not bump generation");
    t.kube.make_statefulset_ready("default", "s").unwrap();
    assert_eq!(t.kube.object("sts", "default", "s").unwrap()["status"]["readyReplicas"], 3);
}

#[tokio::test]
async fn namespace_deletion_terminates_then_removes_the_contents() {
    let t = setup().await;
    t.kube.set_namespace_deletion(NamespaceDeletion::Manual);
    t.post("/api/v1/namespaces", namespace("hx-a", json!({}))).await;
    t.post("/api/v1/namespaces/hx-a/configmaps", configmap("c", json!({}))).await;
    let mut held = configmap("held", json!({}));
    held["metadata"]["finalizers"] = json!(["example.com/hold"]);
    t.post("/api/v1/namespaces/hx-a/configmaps", held).await;

    let deleted = t.delete("/api/v1/namespaces/hx-a").await;
    assert_eq!(deleted.status, 200);
    assert_eq!(deleted.body["status"]["phase"], "Terminating");
    assert!(deleted.body["metadata"]["deletionTimestamp"].is_string());
    let refused = t.post("/api/v1/namespaces/hx-a/configmaps", configmap("new", json!({}))).await;
    assert_status(&refused, 403, "Forbidden");
    assert_eq!(refused.body["details"]["causes"][0]["reason"], "NamespaceTerminating");
    let twice = t.delete("/api/v1/namespaces/hx-a").await;
    assert_status(&twice, 409, "Conflict");
    assert_eq!(t.get("/api/v1/namespaces/hx-a/configmaps/c").await.status, 200, "nothing happens until released");

    assert!(t.kube.finish_namespace_deletion("hx-a"));
    assert_eq!(t.get("/api/v1/namespaces/hx-a/configmaps/c").await.status, 404);
    assert!(t.kube.object("configmaps", "hx-a", "held").unwrap()["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(t.get("/api/v1/namespaces/hx-a").await.status, 200, "kept while content remains");
    t.kube
        .upsert(
            "configmaps",
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "held", "namespace": "hx-a"}}),
            "tester",
        )
        .unwrap();
    assert_status(&t.get("/api/v1/namespaces/hx-a").await, 404, "NotFound");

    // Immediate mode (the default) finalizes right after the DELETE.
    t.kube.set_namespace_deletion(NamespaceDeletion::Immediate);
    t.post("/api/v1/namespaces", namespace("hx-b", json!({}))).await;
    t.post("/api/v1/namespaces/hx-b/configmaps", configmap("c", json!({}))).await;
    assert_eq!(t.delete("/api/v1/namespaces/hx-b").await.body["status"]["phase"], "Terminating");
    assert!(t.kube.object("namespaces", "", "hx-b").is_none());
    assert!(t.kube.list("configmaps", Some("hx-b")).is_empty());
    // After(d): gone once the delay has passed.
    t.kube.set_namespace_deletion(NamespaceDeletion::After(Duration::from_millis(50)));
    t.post("/api/v1/namespaces", namespace("hx-c", json!({}))).await;
    t.delete("/api/v1/namespaces/hx-c").await;
    assert!(t.kube.object("namespaces", "", "hx-c").is_some());
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.kube.object("namespaces", "", "hx-c").is_some() {
        assert!(Instant::now() < deadline, "hx-c was not finalized");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let protected = t.delete("/api/v1/namespaces/kube-system").await;
    assert_status(&protected, 403, "Forbidden");
}

#[tokio::test]
async fn faults_answer_with_status_errors_then_stop() {
    let t = setup().await;
    t.kube.fail_next(Verb::Patch, "namespaces", 500, 2);
    t.kube.fail_next(Verb::Get, "helmcharts.helm.cattle.io", 403, 1);
    t.kube.inject(Fault::new(Verb::Any, "configmaps", 422, 1).named("special"));
    let body = namespace("hx-a", json!({}));
    for _ in 0..2 {
        let failed = t.apply("/api/v1/namespaces/hx-a", "m", false, body.clone()).await;
        assert_status(&failed, 500, "InternalError");
    }
    assert_eq!(t.apply("/api/v1/namespaces/hx-a", "m", false, body).await.status, 201);
    let forbidden = t.get(&format!("{HC}/x")).await;
    assert_status(&forbidden, 403, "Forbidden");
    assert!(forbidden.body["message"].as_str().unwrap().contains(
        "cannot get resource \"helmcharts\" in API group \"helm.cattle.io\" in the namespace \"kube-system\""
    ));
    assert_status(&t.get(&format!("{HC}/x")).await, 404, "NotFound");
    assert_eq!(t.get("/api/v1/namespaces/default/configmaps/other").await.status, 404);
    assert_status(&t.get("/api/v1/namespaces/default/configmaps/special").await, 422, "Invalid");
    // Faulted writes count as writes, not changes.
    assert_eq!((t.kube.writes(), t.kube.changes()), (3, 1));

    t.kube.fail_next(Verb::Create, "*", 409, 1);
    assert_status(&t.post("/api/v1/namespaces", namespace("hx-b", json!({}))).await, 409, "AlreadyExists");
    t.kube.fail_next(Verb::Update, "*", 409, 1);
    let ns = t.kube.object("ns", "", "hx-a").unwrap();
    assert_status(&t.put("/api/v1/namespaces/hx-a", ns).await, 409, "Conflict");
    t.kube.fail_next(Verb::List, "*", 404, 1);
    assert_status(&t.get("/api/v1/namespaces").await, 404, "NotFound");

    t.kube.fail_all(Some(503));
    assert_status(&t.get("/api").await, 503, "ServiceUnavailable");
    assert_status(&t.get("/api/v1/namespaces/hx-a").await, 503, "ServiceUnavailable");
    t.kube.fail_all(None);
    assert_eq!(t.get("/api/v1/namespaces/hx-a").await.status, 200);

    t.kube.set_latency(Duration::from_millis(100));
    let started = Instant::now();
    t.get("/api").await;
    assert!(started.elapsed() >= Duration::from_millis(100), "latency is a lower bound on every answer");
    t.kube.set_latency(Duration::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_goes_away_and_comes_back_on_the_same_port() {
    let t = setup().await;
    t.post("/api/v1/namespaces", namespace("hx-a", json!({}))).await;
    let url = t.kube.url();
    t.kube.set_down(true);
    for _ in 0..3 {
        let result = t.http.get(format!("{url}/api/v1/namespaces/hx-a")).send().await;
        assert!(result.is_err(), "answered while down: {result:?}");
    }
    let fresh = reqwest::Client::new();
    assert!(fresh.get(format!("{url}/api")).send().await.is_err());
    t.kube.set_down(false);
    assert_eq!(t.kube.url(), url);
    let back = t.get("/api/v1/namespaces/hx-a").await;
    assert_eq!(back.status, 200, "state survives: {}", back.text);
}

#[tokio::test]
async fn helmchart_install_job_runs_and_the_statefulset_follows() {
    let t = setup().await;
    t.post("/api/v1/namespaces", namespace("hx-acme", json!({}))).await;
    let applied = t.apply(&format!("{HC}/acme"), "hexa-coordinator", false, helmchart("acme", "hx-acme", 3)).await;
    assert_eq!(applied.status, 201, "{}", applied.text);
    assert_eq!(applied.body["spec"]["failurePolicy"], "reinstall", "CRD default");
    assert_eq!(applied.body["spec"]["driver"], "secret", "CRD default");

    let chart = t.kube.object("helmcharts", "kube-system", "acme").unwrap();
    assert_eq!(chart["metadata"]["finalizers"], json!([HELM_CHART_FINALIZER]));
    assert_eq!(chart["metadata"]["annotations"][HELM_MANAGED_BY_ANNOTATION], "helm-controller");
    assert_eq!(chart["status"]["jobName"], "helm-install-acme");
    assert_eq!(chart["status"]["conditions"][0]["type"], "JobCreated");
    let job = t.get("/apis/batch/v1/namespaces/kube-system/jobs/helm-install-acme").await.body;
    assert_eq!(job["metadata"]["labels"][HELM_CHART_LABEL], "acme");
    assert_eq!(job["metadata"]["ownerReferences"][0]["uid"], chart["metadata"]["uid"]);
    assert_eq!(job["status"]["active"], 1);
    assert!(
        job["spec"]["template"]["metadata"]["annotations"][HELM_CONFIG_HASH_ANNOTATION]
            .as_str()
            .unwrap()
            .starts_with("SHA256=")
    );
    let args = job["spec"]["template"]["spec"]["containers"][0]["args"].clone();
    assert_eq!(args, json!(["install", "--namespace", "hx-acme", "--version", "0.36.1"]));

    // Re-applying the same chart changes nothing (the controller's own fields are its own).
    let writes_before = t.kube.changes();
    let again = t.apply(&format!("{HC}/acme"), "hexa-coordinator", false, helmchart("acme", "hx-acme", 3)).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(t.kube.changes(), writes_before);

    t.kube.complete_job("kube-system", "helm-install-acme").unwrap();
    let job = t.kube.object("jobs", "kube-system", "helm-install-acme").unwrap();
    let kinds: Vec<&str> =
        job["status"]["conditions"].as_array().unwrap().iter().map(|c| c["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["SuccessCriteriaMet", "Complete"]);
    assert_eq!(job["status"]["succeeded"], 1);
    let sts = t.kube.object("statefulsets", "hx-acme", "acme").unwrap();
    assert_eq!(sts["spec"]["replicas"], 3);
    assert!(sts["status"].get("readyReplicas").is_none(), "not ready yet: {}", sts["status"]);
    t.kube.make_statefulset_ready("hx-acme", "acme").unwrap();
    assert_eq!(t.kube.object("statefulsets", "hx-acme", "acme").unwrap()["status"]["readyReplicas"], 3);

    // New values: helm-controller replaces the install Job with a fresh one.
    let old_uid = job["metadata"]["uid"].clone();
    t.apply(&format!("{HC}/acme"), "hexa-coordinator", false, helmchart("acme", "hx-acme", 1)).await;
    let job = t.kube.object("jobs", "kube-system", "helm-install-acme").unwrap();
    assert_ne!(job["metadata"]["uid"], old_uid);
    assert!(job["status"].get("succeeded").is_none());
    assert!(t.kube.complete_job("kube-system", "helm-install-acme").is_ok());
    assert!(t.kube.complete_job("kube-system", "helm-install-acme").is_err(), "a finished Job stays finished");
    assert_eq!(t.kube.object("statefulsets", "hx-acme", "acme").unwrap()["spec"]["replicas"], 1);
}

#[tokio::test]
async fn failed_install_jobs_are_reported_on_the_job() {
    let t = setup().await;
    // No target namespace: the install fails as Helm's would.
    t.apply(&format!("{HC}/acme"), "hexa-coordinator", false, helmchart("acme", "hx-missing", 1)).await;
    let err = t.kube.complete_job("kube-system", "helm-install-acme").unwrap_err();
    assert!(err.contains("namespaces \"hx-missing\" not found"), "{err}");
    let job = t.kube.object("jobs", "kube-system", "helm-install-acme").unwrap();
    assert_eq!(job["status"]["failed"], 1, "a pod failed");
    assert_eq!(job["status"]["active"], 1, "and the Job retries (backoffLimit 1000)");
    assert!(job["status"].get("conditions").is_none());
    assert!(t.kube.object("statefulsets", "hx-missing", "acme").is_none());
    t.post("/api/v1/namespaces", namespace("hx-missing", json!({}))).await;
    t.kube.complete_job("kube-system", "helm-install-acme").unwrap();
    assert!(t.kube.object("statefulsets", "hx-missing", "acme").is_some());

    // Instant mode: the retry succeeds by itself once the namespace appears.
    t.kube.set_helm_controller(HelmControllerSettings::instant());
    t.apply(&format!("{HC}/late"), "hexa-coordinator", false, helmchart("late", "hx-late", 1)).await;
    assert!(t.kube.object("jobs", "kube-system", "helm-install-late").unwrap()["status"]["failed"] == 1);
    t.apply("/api/v1/namespaces/hx-late", "hexa-coordinator", false, namespace("hx-late", json!({}))).await;
    let job = t.kube.object("jobs", "kube-system", "helm-install-late").unwrap();
    assert_eq!(job["status"]["succeeded"], 1, "{}", job["status"]);
    assert_eq!(t.kube.object("statefulsets", "hx-late", "late").unwrap()["status"]["readyReplicas"], 1);
    t.kube.set_helm_controller(HelmControllerSettings::default());

    t.post("/api/v1/namespaces", namespace("hx-b", json!({}))).await;
    t.apply(&format!("{HC}/b"), "hexa-coordinator", false, helmchart("b", "hx-b", 1)).await;
    t.kube.fail_job("kube-system", "helm-install-b", "chart vcluster-9.9.9 not found").unwrap();
    let job = t.kube.object("jobs", "kube-system", "helm-install-b").unwrap();
    assert_eq!(job["status"]["conditions"][1]["message"], "chart vcluster-9.9.9 not found");
    assert_eq!(job["status"]["failed"], 1);
    assert!(t.kube.complete_job("kube-system", "nope").is_err());
}

#[tokio::test]
async fn deleting_a_helmchart_runs_the_delete_job_and_holds_the_finalizer() {
    let t = setup().await;
    t.post("/api/v1/namespaces", namespace("hx-acme", json!({}))).await;
    t.apply(&format!("{HC}/acme"), "hexa-coordinator", false, helmchart("acme", "hx-acme", 1)).await;
    t.kube.complete_job("kube-system", "helm-install-acme").unwrap();
    assert!(t.kube.object("statefulsets", "hx-acme", "acme").is_some());

    let deleted = t.delete(&format!("{HC}/acme")).await;
    assert_eq!(deleted.status, 200);
    assert!(deleted.body["metadata"]["deletionTimestamp"].is_string(), "{}", deleted.text);
    assert!(t.kube.object("jobs", "kube-system", "helm-install-acme").is_none());
    let job = t.kube.object("jobs", "kube-system", "helm-delete-acme").unwrap();
    assert_eq!(job["spec"]["template"]["spec"]["containers"][0]["args"], json!(["delete"]));
    assert!(t.kube.object("helmcharts", "kube-system", "acme").is_some(), "held by {HELM_CHART_FINALIZER}");
    // Re-applying while deleting does not bring it back.
    let reapplied = t.apply(&format!("{HC}/acme"), "hexa-coordinator", false, helmchart("acme", "hx-acme", 1)).await;
    assert!(reapplied.body["metadata"]["deletionTimestamp"].is_string());

    t.kube.complete_job("kube-system", "helm-delete-acme").unwrap();
    assert_status(&t.get(&format!("{HC}/acme")).await, 404, "NotFound");
    assert!(t.kube.object("statefulsets", "hx-acme", "acme").is_none(), "helm uninstall removed the release");
    assert!(t.kube.list("jobs", Some("kube-system")).is_empty());

    // With instant settings the whole cycle happens on its own.
    t.kube.set_helm_controller(HelmControllerSettings::instant());
    t.apply(&format!("{HC}/acme"), "hexa-coordinator", false, helmchart("acme", "hx-acme", 2)).await;
    assert_eq!(t.kube.object("statefulsets", "hx-acme", "acme").unwrap()["status"]["readyReplicas"], 2);
    t.delete(&format!("{HC}/acme")).await;
    assert!(t.kube.object("helmcharts", "kube-system", "acme").is_none());
}

#[tokio::test]
async fn helmcharts_are_validated_against_the_crd_schema() {
    let t = setup().await;
    let mut bad = helmchart("bad", "hx-a", 1);
    bad["spec"]["bootstrap"] = json!("yes");
    bad["spec"]["failurePolicy"] = json!("sometimes");
    let refused = t.apply(&format!("{HC}/bad"), "hexa-coordinator", false, bad).await;
    assert_status(&refused, 422, "Invalid");
    let causes = refused.body["details"]["causes"].as_array().unwrap();
    let mut fields: Vec<(&str, &str)> =
        causes.iter().map(|c| (c["field"].as_str().unwrap(), c["reason"].as_str().unwrap())).collect();
    fields.sort();
    assert_eq!(fields, [("spec.bootstrap", "FieldValueTypeInvalid"), ("spec.failurePolicy", "FieldValueNotSupported")]);
    let message = refused.body["message"].as_str().unwrap();
    assert!(message.starts_with("HelmChart.helm.cattle.io \"bad\" is invalid: ["), "{message}");
    assert!(message.contains("spec.bootstrap in body must be of type boolean: \"string\""), "{message}");
    assert_eq!(refused.body["details"]["kind"], "HelmChart");
    assert!(t.kube.object("helmcharts", "kube-system", "bad").is_none());

    // Unknown fields are dropped with a warning, or refused when asked to be strict.
    let mut extra = helmchart("extra", "hx-a", 1);
    extra["spec"]["valuesContnet"] = json!("typo");
    let strict = t
        .call("PATCH", &format!("{HC}/extra?fieldManager=m&fieldValidation=Strict"), Some(APPLY), Some(extra.clone()))
        .await;
    assert_status(&strict, 400, "BadRequest");
    assert!(strict.body["message"].as_str().unwrap().contains("unknown field \"spec.valuesContnet\""));
    let warned = t.apply(&format!("{HC}/extra"), "m", false, extra).await;
    assert_eq!(warned.status, 201);
    assert!(warned.body["spec"].get("valuesContnet").is_none());
    let warning = warned.headers.get("warning").unwrap().to_str().unwrap();
    assert!(warning.contains("unknown field"), "{warning}");
    assert_eq!(t.kube.requests().last().unwrap().warnings, vec!["unknown field \"spec.valuesContnet\"".to_string()]);

    // The CRD's transition rule: driver is immutable once set.
    let mut driver = helmchart("extra", "hx-a", 1);
    driver["spec"]["driver"] = json!("configmap");
    let immutable = t.apply(&format!("{HC}/extra"), "m", false, driver).await;
    assert_status(&immutable, 422, "Invalid");
    assert!(
        immutable.body["message"].as_str().unwrap().contains("driver is immutable after creation"),
        "{}",
        immutable.text
    );
}

#[tokio::test]
async fn watch_streams_changes_after_a_resource_version() {
    let t = setup().await;
    t.post("/api/v1/namespaces/default/configmaps", configmap("before", json!({}))).await;
    let from = t.kube.resource_version();
    let mut watch = t
        .http
        .get(format!(
            "{}/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={from}&timeoutSeconds=10",
            t.kube.url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(watch.status(), 200);
    t.post("/api/v1/namespaces/default/configmaps", configmap("after", json!({}))).await;
    t.delete("/api/v1/namespaces/default/configmaps/after").await;
    let mut text = String::new();
    while text.lines().count() < 2 {
        let chunk = tokio::time::timeout(Duration::from_secs(10), watch.chunk()).await.unwrap().unwrap().unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let events: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(events[0]["object"]["metadata"]["name"], "after");
    assert_eq!(events[1]["type"], "DELETED");
    assert!(rv(&events[1]["object"]) > rv(&events[0]["object"]));

    // From scratch, a watch starts with the current objects.
    let initial = t
        .http
        .get(format!("{}/api/v1/namespaces/default/configmaps?watch=1&timeoutSeconds=1", t.kube.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let first: Value = serde_json::from_str(initial.lines().next().unwrap()).unwrap();
    assert_eq!((first["type"].as_str(), first["object"]["metadata"]["name"].as_str()), (Some("ADDED"), Some("before")));
}

#[tokio::test]
async fn a_watch_resumed_from_before_a_compaction_is_told_410_expired() {
    let t = setup().await;
    t.post("/api/v1/namespaces/default/configmaps", configmap("one", json!({}))).await;
    let old = t.kube.resource_version();
    t.post("/api/v1/namespaces/default/configmaps", configmap("two", json!({}))).await;
    t.kube.compact();
    let url = |from: u64| {
        format!(
            "{}/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={from}&timeoutSeconds=1",
            t.kube.url()
        )
    };
    let expired = t.http.get(url(old)).send().await.unwrap();
    assert_eq!(expired.status(), 200, "watch errors come as an event on an open stream");
    let text = expired.text().await.unwrap();
    let event: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(event["type"], "ERROR");
    assert_eq!((event["object"]["code"].as_u64(), event["object"]["reason"].as_str()), (Some(410), Some("Expired")));
    // From now on, resuming works again.
    let now = t.kube.resource_version();
    let current = t.http.get(url(now)).send().await.unwrap().text().await.unwrap();
    assert!(current.is_empty(), "{current}");
}

#[tokio::test]
async fn nodes_get_distinct_pod_ranges_and_pods_run_where_they_are_bound() {
    let t = setup().await;
    let range = |name: &str| t.kube.object("nodes", "", name).unwrap()["spec"]["podCIDR"].as_str().unwrap().to_string();
    t.kube.add_node("a", &[]).unwrap();
    t.kube.add_node("b", &[]).unwrap();
    assert_eq!((range("a"), range("b")), ("10.42.0.0/24".to_string(), "10.42.1.0/24".to_string()));
    t.kube.add_node("a", &[("x", "y")]).unwrap();
    assert_eq!(range("a"), "10.42.0.0/24", "a node registered again keeps its range");
    t.kube.add_pod("hx-acme", "web", "b", "10.42.1.5").unwrap();
    let pod = t.get("/api/v1/namespaces/hx-acme/pods/web").await;
    assert_eq!(pod.status, 200, "{}", pod.text);
    assert_eq!(pod.body["spec"]["nodeName"], "b");
    assert_eq!(pod.body["status"]["podIP"], "10.42.1.5");
    assert_eq!(pod.body["status"]["phase"], "Running");
}

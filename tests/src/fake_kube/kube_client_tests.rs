use super::*;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::core::{ApiResource, GroupVersionKind};

fn client(fake: &FakeKube) -> kube::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = kube::Config::new(fake.url().parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

fn api_status(err: kube::Error) -> (u16, String, String) {
    match err {
        kube::Error::Api(status) => (status.code, status.reason.clone(), status.message.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn helm_charts(client: &kube::Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("helm.cattle.io", "v1", "HelmChart");
    Api::namespaced_with(client.clone(), "kube-system", &ApiResource::from_gvk_with_plural(&gvk, "helmcharts"))
}

#[tokio::test]
async fn typed_api_applies_reads_lists_and_deletes() {
    let fake = FakeKube::start().await;
    let client = client(&fake);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ssa = PatchParams::apply("hexa-coordinator");
    let ns = json!({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": "hx-a", "labels": {"hexabase.ai/tenant": "a", "stale": "x"}}});
    namespaces.patch("hx-a", &ssa, &Patch::Apply(&ns)).await.unwrap();
    let ns = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "hx-a", "labels": {"hexabase.ai/tenant": "a"}}});
    let applied = namespaces.patch("hx-a", &ssa, &Patch::Apply(&ns)).await.unwrap();
    let labels = applied.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("hexabase.ai/tenant").map(String::as_str), Some("a"));
    assert!(!labels.contains_key("stale"));
    assert_eq!(applied.status.and_then(|s| s.phase).as_deref(), Some("Active"));
    let rv = applied.metadata.resource_version.clone();
    let again = namespaces.patch("hx-a", &ssa, &Patch::Apply(&ns)).await.unwrap();
    assert_eq!(again.metadata.resource_version, rv, "no-op apply");
    assert_eq!((fake.writes(), fake.changes()), (3, 2));

    assert!(namespaces.get_opt("hx-nope").await.unwrap().is_none());
    let exists = namespaces.create(&PostParams::default(), &serde_json::from_value(ns.clone()).unwrap()).await;
    assert_eq!(api_status(exists.unwrap_err()).1, "AlreadyExists");

    let clash = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "hx-a", "labels": {"hexabase.ai/tenant": "b"}}});
    let (code, reason, message) =
        api_status(namespaces.patch("hx-a", &PatchParams::apply("other"), &Patch::Apply(&clash)).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert!(message.contains("conflict with \"hexa-coordinator\""), "{message}");
    namespaces.patch("hx-a", &PatchParams::apply("other").force(), &Patch::Apply(&clash)).await.unwrap();

    let listed = namespaces.list(&ListParams::default().labels("hexabase.ai/tenant=b")).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].metadata.name.as_deref(), Some("hx-a"));
    let deleted = namespaces.delete("hx-a", &DeleteParams::default()).await.unwrap();
    assert!(deleted.is_left(), "a namespace delete answers with the namespace");
    assert!(namespaces.get_opt("hx-a").await.unwrap().is_none());
}

#[tokio::test]
async fn dynamic_api_for_helmcharts_and_discovery() {
    let fake = FakeKube::start().await;
    let client = client(&fake);
    let discovery = kube::Discovery::new(client.clone()).run().await.unwrap();
    assert!(discovery.has_group("helm.cattle.io"));
    let (resource, caps) = discovery.resolve_gvk(&GroupVersionKind::gvk("helm.cattle.io", "v1", "HelmChart")).unwrap();
    assert_eq!(resource.plural, "helmcharts");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
    let aggregated = kube::Discovery::new(client.clone()).run_aggregated().await.unwrap();
    assert!(aggregated.has_group("batch"));

    let charts = helm_charts(&client);
    let chart = json!({
        "apiVersion": "helm.cattle.io/v1", "kind": "HelmChart",
            "metadata": {"name": "acme", "namespace": "kube-system"},
        "spec": {"chart": "vcluster", "repo": "https://charts.loft.sh", "version": "0.36.1",
            "targetNamespace": "default"},
    });
    let chart: DynamicObject = serde_json::from_value(chart).unwrap();
    charts.patch("acme", &PatchParams::apply("hexa-coordinator"), &Patch::Apply(&chart)).await.unwrap();
    fake.complete_job("kube-system", "helm-install-acme").unwrap();
    let jobs: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "kube-system",
        &ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("batch", "v1", "Job"), "jobs"),
    );
    let job = jobs.get("helm-install-acme").await.unwrap();
    assert_eq!(job.data["status"]["succeeded"], 1);

    let mut bad = chart.clone();
    bad.data["spec"]["failurePolicy"] = json!("never");
    let (code, reason, message) = api_status(
        charts.patch("acme", &PatchParams::apply("hexa-coordinator"), &Patch::Apply(&bad)).await.unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    assert!(message.contains("spec.failurePolicy: Unsupported value: \"never\""), "{message}");

    let deleted = charts.delete("acme", &DeleteParams::default()).await.unwrap();
    assert!(deleted.is_left());
    fake.complete_job("kube-system", "helm-delete-acme").unwrap();
    assert!(charts.get_opt("acme").await.unwrap().is_none());

    // A missing CRD: kube sees a 404 it can tell apart.
    assert!(fake.set_served("helmcharts", false) && fake.set_served("helmchartconfigs", false));
    assert_eq!(api_status(charts.list(&ListParams::default()).await.unwrap_err()).0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_outages_and_watches_as_kube_sees_them() {
    let fake = FakeKube::start().await;
    let client = client(&fake);
    let namespaces: Api<Namespace> = Api::all(client.clone());

    fake.fail_next(Verb::Get, "namespaces", 500, 1);
    assert_eq!(api_status(namespaces.get("default").await.unwrap_err()).1, "InternalError");
    fake.fail_next(Verb::Patch, "namespaces", 403, 1);
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "hx-w"}});
    let ssa = PatchParams::apply("hexa-coordinator");
    assert_eq!(api_status(namespaces.patch("hx-w", &ssa, &Patch::Apply(&ns)).await.unwrap_err()).0, 403);

    let mut events = namespaces.watch(&WatchParams::default().timeout(10), "0").await.unwrap().boxed();
    namespaces.patch("hx-w", &ssa, &Patch::Apply(&ns)).await.unwrap();
    let mut seen = Vec::new();
    while !seen.contains(&"hx-w".to_string()) {
        match tokio::time::timeout(Duration::from_secs(10), events.next()).await.unwrap().unwrap().unwrap() {
            WatchEvent::Added(ns) => seen.push(ns.metadata.name.unwrap_or_default()),
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(events);

    fake.set_down(true);
    let err = namespaces.get("hx-w").await.unwrap_err();
    assert!(!matches!(err, kube::Error::Api(_)), "a transport error, not an API answer: {err:?}");
    fake.set_down(false);
    assert!(namespaces.get("hx-w").await.is_ok());
}

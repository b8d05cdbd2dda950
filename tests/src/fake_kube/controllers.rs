//! The controllers a test plays: helm-controller, the Job and StatefulSet controllers, the
//! namespace controller.

use std::collections::BTreeSet;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::apply::{finalizers, is_deleting, meta_str, set_map_entry};
use super::http::{escape_pointer, now_rfc3339};
use super::store::{Key, Owner, State, Sub};
use super::types::NamespaceDeletion;
use super::{
    HELM_CHART_FINALIZER, HELM_CHART_LABEL, HELM_CONFIG_HASH_ANNOTATION, HELM_CONTROLLER_MANAGER,
    HELM_MANAGED_BY_ANNOTATION, HELM_UNMANAGED_ANNOTATION,
};

impl State {
    /// Lets the controllers react to what changed, until nothing more does.
    pub(super) fn run_controllers(&mut self) {
        for _ in 0..100 {
            let dirty = std::mem::take(&mut self.dirty);
            if dirty.is_empty() {
                return;
            }
            let mut charts = BTreeSet::new();
            let mut namespaces = BTreeSet::new();
            if dirty.iter().any(|k| k.group.is_empty() && matches!(k.plural.as_str(), "secrets" | "serviceaccounts")) {
                self.fill_service_account_tokens();
            }
            for key in &dirty {
                if key.group == "helm.cattle.io" && key.plural == "helmcharts" {
                    charts.insert(key.clone());
                }
                if key.group == "batch" && key.plural == "jobs" {
                    let chart = key.name.strip_prefix("helm-install-").or(key.name.strip_prefix("helm-delete-"));
                    if let Some(chart) = chart {
                        charts.insert(Key::of("helm.cattle.io", "helmcharts", &key.namespace, chart));
                    }
                }
                if key.is_namespace() {
                    namespaces.insert(key.name.clone());
                } else if !key.namespace.is_empty() {
                    namespaces.insert(key.namespace.clone());
                }
            }
            if self.helm.enabled && self.helm.complete_install {
                // Install pods that failed for want of their namespace succeed once it exists.
                for ns in namespaces.iter().filter(|ns| self.objects.contains_key(&Key::namespace(ns))) {
                    charts.extend(self.charts_waiting_for(ns));
                }
            }
            for chart in charts {
                self.reconcile_chart(&chart);
            }
            for namespace in namespaces {
                self.reconcile_namespace(&namespace);
            }
        }
    }

    /// helm-controller's OnChange and OnRemove for one HelmChart.
    pub(super) fn reconcile_chart(&mut self, key: &Key) {
        if !self.helm.enabled {
            return;
        }
        let Some(chart) = self.objects.get(key).map(|s| s.obj.clone()) else { return };
        let spec_str = |field: &str| chart.pointer(&format!("/spec/{field}")).and_then(Value::as_str).unwrap_or("");
        if spec_str("chart").is_empty() && spec_str("chartContent").is_empty() {
            return;
        }
        let annotations = chart.pointer("/metadata/annotations");
        if annotations.and_then(|a| a.get(HELM_UNMANAGED_ANNOTATION)).is_some() {
            return;
        }
        match annotations.and_then(|a| a.get(HELM_MANAGED_BY_ANNOTATION)).and_then(Value::as_str) {
            None => {
                // Claim it; the update brings the chart back here.
                self.internal_update(key, HELM_CONTROLLER_MANAGER, Sub::Main, |o| {
                    set_map_entry(
                        o,
                        &["metadata", "annotations"],
                        HELM_MANAGED_BY_ANNOTATION,
                        json!(HELM_CONTROLLER_MANAGER),
                    );
                });
                return;
            }
            Some(HELM_CONTROLLER_MANAGER) => {}
            Some(_) => return,
        }
        let install_key = Key::of("batch", "jobs", &key.namespace, &format!("helm-install-{}", key.name));
        let delete_key = Key::of("batch", "jobs", &key.namespace, &format!("helm-delete-{}", key.name));
        let has_finalizer = finalizers(&chart).iter().any(|f| f == HELM_CHART_FINALIZER);

        if !is_deleting(&chart) {
            if !has_finalizer {
                self.internal_update(key, HELM_CONTROLLER_MANAGER, Sub::Main, |o| {
                    let list =
                        o["metadata"].as_object_mut().map(|m| m.entry("finalizers").or_insert_with(|| json!([])));
                    if let Some(Value::Array(list)) = list {
                        list.push(json!(HELM_CHART_FINALIZER));
                    }
                });
                return;
            }
            let desired = helm_job(&chart, "install");
            let current = self.objects.get(&install_key).map(|s| s.obj["spec"].clone());
            if current.as_ref() != Some(&desired["spec"]) {
                // Jobs are immutable: helm-controller's patcher deletes the Job and creates it anew.
                if current.is_some() {
                    self.purge(&install_key, false);
                }
                if self.create_job(desired) && self.helm.complete_install {
                    let _ = self.complete_job(&install_key);
                }
            } else if self.helm.complete_install && self.job(&install_key).is_ok() {
                let target = target_namespace(&chart);
                let open = self.objects.get(&Key::namespace(&target)).is_some_and(|s| !is_deleting(&s.obj));
                if open {
                    let _ = self.complete_job(&install_key);
                }
            }
            let job_name = install_key.name.clone();
            let status = json!({
                "jobName": job_name,
                "conditions": [
                    {"type": "JobCreated", "status": "True", "reason": "Job created",
                     "message": format!("Applying HelmChart using Job {}/{job_name}", key.namespace)},
                    {"type": "Failed", "status": "False"},
                ],
            });
            if chart.get("status") != Some(&status) {
                self.internal_update(key, HELM_CONTROLLER_MANAGER, Sub::Status, |o| o["status"] = status);
            }
            return;
        }

        if !has_finalizer {
            return;
        }
        if self.objects.contains_key(&install_key) {
            self.purge(&install_key, false);
        }
        if !self.objects.contains_key(&delete_key)
            && self.create_job(helm_job(&chart, "delete"))
            && self.helm.complete_delete
        {
            let _ = self.complete_job(&delete_key);
        }
        let succeeded = self
            .objects
            .get(&delete_key)
            .and_then(|s| s.obj.pointer("/status/succeeded"))
            .and_then(Value::as_u64)
            .is_some_and(|n| n > 0);
        if succeeded {
            self.helm_uninstall(&chart);
            self.purge(&delete_key, false);
            self.internal_update(key, HELM_CONTROLLER_MANAGER, Sub::Main, |o| {
                if let Some(list) = o.pointer_mut("/metadata/finalizers").and_then(Value::as_array_mut) {
                    list.retain(|f| f != HELM_CHART_FINALIZER);
                }
            });
        }
    }

    /// Creates a Job as helm-controller does, and starts it as the Job controller would.
    pub(super) fn create_job(&mut self, job: Value) -> bool {
        let Some(def) = self.def_of(&Key::of("batch", "jobs", "", "")) else { return false };
        let namespace = meta_str(&job, "namespace").unwrap_or_default().to_string();
        let Ok(created) =
            self.create_object(&def, &namespace, job, Owner::Update(HELM_CONTROLLER_MANAGER.into()), false, false)
        else {
            return false;
        };
        let key = Key::new(&def, &namespace, meta_str(&created, "name").unwrap_or_default());
        let now = now_rfc3339();
        self.internal_update(&key, "k3s", Sub::Status, |o| {
            o["status"] =
                json!({"active": 1, "ready": 0, "terminating": 0, "startTime": now, "uncountedTerminatedPods": {}});
        });
        true
    }

    pub(super) fn complete_job(&mut self, key: &Key) -> Result<(), String> {
        let job = self.job(key)?;
        if key.name.starts_with("helm-install-") {
            let chart_name = job.pointer(&format!("/metadata/labels/{}", escape_pointer(HELM_CHART_LABEL)));
            let chart_name = chart_name.and_then(Value::as_str).unwrap_or(&key.name["helm-install-".len()..]);
            let chart_key = Key::of("helm.cattle.io", "helmcharts", &key.namespace, chart_name);
            if let Some(chart) = self.objects.get(&chart_key).map(|s| s.obj.clone())
                && let Err(message) = self.helm_install(&chart)
            {
                // The pod failed; with helm-controller's backoffLimit (1000) the Job stays active
                // and a new pod retries.
                self.internal_update(key, "k3s", Sub::Status, |o| {
                    let failed = o.pointer("/status/failed").and_then(Value::as_u64).unwrap_or(0);
                    o["status"]["failed"] = json!(failed + 1);
                });
                return Err(message);
            }
        }
        self.finish_job(key, true, "Reached expected number of succeeded pods");
        Ok(())
    }

    /// Charts targeting `namespace` whose install Job is still running.
    pub(super) fn charts_waiting_for(&self, namespace: &str) -> Vec<Key> {
        self.of_kind("helm.cattle.io", "helmcharts")
            .filter(|(_, s)| s.obj.pointer("/spec/targetNamespace").and_then(Value::as_str) == Some(namespace))
            .filter(|(k, _)| {
                let job = Key::of("batch", "jobs", &k.namespace, &format!("helm-install-{}", k.name));
                self.job(&job).is_ok()
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    pub(super) fn fail_job(&mut self, key: &Key, message: &str) -> Result<(), String> {
        self.job(key)?;
        self.finish_job(key, false, message);
        Ok(())
    }

    pub(super) fn job(&self, key: &Key) -> Result<Value, String> {
        let job = self
            .objects
            .get(key)
            .map(|s| s.obj.clone())
            .ok_or_else(|| format!("Job {}/{} not found", key.namespace, key.name))?;
        let finished = job.pointer("/status/conditions").and_then(Value::as_array).is_some_and(|cs| {
            cs.iter().any(|c| matches!(c["type"].as_str(), Some("Complete" | "Failed")) && c["status"] == "True")
        });
        if finished {
            return Err(format!("Job {}/{} has already finished", key.namespace, key.name));
        }
        Ok(job)
    }

    pub(super) fn finish_job(&mut self, key: &Key, success: bool, message: &str) {
        let now = now_rfc3339();
        let condition = |kind: &str, reason: &str| {
            json!({"type": kind, "status": "True", "reason": reason, "message": message,
                   "lastProbeTime": now, "lastTransitionTime": now})
        };
        self.internal_update(key, "k3s", Sub::Status, |o| {
            let start = o.pointer("/status/startTime").cloned().unwrap_or(json!(now));
            o["status"] = if success {
                json!({
                    "startTime": start, "completionTime": now, "succeeded": 1, "ready": 0, "terminating": 0,
                    "uncountedTerminatedPods": {},
                    "conditions": [condition("SuccessCriteriaMet", "CompletionsReached"),
                        condition("Complete", "CompletionsReached")],
                })
            } else {
                json!({
                    "startTime": start, "failed": 1, "ready": 0, "terminating": 0, "uncountedTerminatedPods": {},
                    "conditions": [condition("FailureTarget", "BackoffLimitExceeded"),
                        condition("Failed", "BackoffLimitExceeded")],
                })
            };
        });
    }

    /// What `helm install/upgrade` of the vcluster chart leaves in the target namespace.
    pub(super) fn helm_install(&mut self, chart: &Value) -> Result<(), String> {
        let release = meta_str(chart, "name").unwrap_or_default().to_string();
        let target = target_namespace(chart);
        let create_namespace = chart.pointer("/spec/createNamespace") == Some(&json!(true));
        match self.objects.get(&Key::namespace(&target)).map(|s| is_deleting(&s.obj)) {
            Some(false) => {}
            Some(true) => {
                return Err(format!(
                    "Error: INSTALLATION FAILED: create: failed to create: namespaces \"{target}\" is forbidden: unable \
                     to create new content in namespace {target} because it is being terminated"
                ));
            }
            None if create_namespace => {
                let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": target}});
                if let Some(def) = self.def_of(&Key::namespace(&target)) {
                    self.upsert(&def, ns, "helm").map_err(|e| e.message)?;
                }
            }
            None => {
                return Err(format!(
                    "Error: INSTALLATION FAILED: create: failed to create: namespaces \"{target}\" not found"
                ));
            }
        }
        if !self.helm.install_statefulset {
            return Ok(());
        }
        let replicas = values_replicas(chart);
        let version = chart.pointer("/spec/version").and_then(Value::as_str).unwrap_or("latest").to_string();
        let Some(def) = self.def_of(&Key::of("apps", "statefulsets", "", "")) else { return Ok(()) };
        let key = Key::new(&def, &target, &release);
        let selector = json!({"app": "vcluster", "release": release});
        let desired_spec = json!({
            "replicas": replicas,
            "serviceName": format!("{release}-headless"),
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": selector},
                "spec": {"containers": [{"name": "syncer",
                    "image": format!("ghcr.io/loft-sh/vcluster-pro:{version}")}]},
            },
        });
        if self.objects.contains_key(&key) {
            self.internal_update(&key, "helm", Sub::Main, |o| o["spec"] = desired_spec);
        } else {
            let sts = json!({
                "apiVersion": "apps/v1", "kind": "StatefulSet",
                "metadata": {
                    "name": release, "namespace": target,
                    "labels": {"app": "vcluster", "release": release, "app.kubernetes.io/managed-by": "Helm"},
                    "annotations": {"meta.helm.sh/release-name": release, "meta.helm.sh/release-namespace": target},
                },
                "spec": desired_spec,
            });
            self.create_object(&def, &target, sts, Owner::Update("helm".into()), false, false)
                .map_err(|e| e.message)?;
        }
        self.internal_update(&key, "k3s", Sub::Status, |o| {
            let generation = o.pointer("/metadata/generation").cloned().unwrap_or(json!(1));
            let ready = o.pointer("/status/readyReplicas").and_then(Value::as_u64).unwrap_or(0).min(replicas);
            let mut status = json!({
                "replicas": replicas, "availableReplicas": ready, "currentReplicas": replicas,
                "updatedReplicas": replicas, "observedGeneration": generation, "collisionCount": 0,
                "currentRevision": format!("{release}-{generation}"),
                    "updateRevision": format!("{release}-{generation}"),
            });
            if ready > 0 {
                status["readyReplicas"] = json!(ready);
            }
            o["status"] = status;
        });
        if self.helm.statefulset_ready {
            self.make_statefulset_ready(&key)?;
        }
        Ok(())
    }

    /// What `helm uninstall` removes: the release's StatefulSet.
    pub(super) fn helm_uninstall(&mut self, chart: &Value) {
        let release = meta_str(chart, "name").unwrap_or_default();
        let key = Key::of("apps", "statefulsets", &target_namespace(chart), release);
        if self.objects.contains_key(&key) {
            self.purge(&key, false);
        }
    }

    pub(super) fn make_statefulset_ready(&mut self, key: &Key) -> Result<(), String> {
        let sts = self
            .objects
            .get(key)
            .map(|s| s.obj.clone())
            .ok_or_else(|| format!("StatefulSet {}/{} not found", key.namespace, key.name))?;
        let replicas = sts.pointer("/spec/replicas").and_then(Value::as_u64).unwrap_or(1);
        self.internal_update(key, "k3s", Sub::Status, |o| {
            let generation = o.pointer("/metadata/generation").cloned().unwrap_or(json!(1));
            let status = o.as_object_mut().map(|m| m.entry("status").or_insert_with(|| json!({})));
            if let Some(Value::Object(status)) = status {
                for field in ["replicas", "availableReplicas", "currentReplicas", "updatedReplicas"] {
                    status.insert(field.into(), json!(replicas));
                }
                status.insert("observedGeneration".into(), generation);
                if replicas > 0 {
                    status.insert("readyReplicas".into(), json!(replicas));
                } else {
                    status.remove("readyReplicas");
                }
            }
        });
        Ok(())
    }

    pub(super) fn release_namespace(&mut self, namespace: &str) -> bool {
        let key = Key::namespace(namespace);
        let terminating = self.objects.get(&key).is_some_and(|s| is_deleting(&s.obj));
        if terminating {
            self.released_namespaces.insert(namespace.to_string());
            self.dirty.insert(key);
        }
        terminating
    }

    /// The namespace controller: empties a terminating namespace, then removes it.
    pub(super) fn reconcile_namespace(&mut self, namespace: &str) {
        let key = Key::namespace(namespace);
        let Some(ns) = self.objects.get(&key).map(|s| s.obj.clone()) else { return };
        if !is_deleting(&ns) {
            return;
        }
        if self.ns_deletion != NamespaceDeletion::Immediate && !self.released_namespaces.contains(namespace) {
            return;
        }
        let contents: Vec<Key> = self.objects.keys().filter(|k| k.namespace == namespace).cloned().collect();
        for content in &contents {
            self.delete_object(content, false);
        }
        if self.objects.keys().any(|k| k.namespace == namespace) {
            return; // objects with finalizers; back here when they change
        }
        let spec_finalizers = ns.pointer("/spec/finalizers").and_then(Value::as_array).is_some_and(|f| !f.is_empty());
        if spec_finalizers {
            // What the namespace controller does through /finalize.
            self.internal_update(&key, "k3s", Sub::Finalize, |o| o["spec"]["finalizers"] = json!([]));
        }
        let still_there = self.objects.get(&key).map(|s| s.obj.clone());
        if let Some(ns) = still_there
            && finalizers(&ns).is_empty()
        {
            self.purge(&key, false);
        }
    }
}

/// Where the chart's release goes: `spec.targetNamespace`, else the chart's own namespace.
pub(super) fn target_namespace(chart: &Value) -> String {
    chart
        .pointer("/spec/targetNamespace")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .or(meta_str(chart, "namespace"))
        .unwrap_or("default")
        .to_string()
}

/// The Job helm-controller creates for `action` (`install` or `delete`).
pub(super) fn helm_job(chart: &Value, action: &str) -> Value {
    let name = meta_str(chart, "name").unwrap_or_default();
    let namespace = meta_str(chart, "namespace").unwrap_or_default();
    let uid = meta_str(chart, "uid").unwrap_or_default();
    let spec = chart.get("spec").cloned().unwrap_or(json!({}));
    let text = |field: &str| spec.get(field).and_then(Value::as_str).unwrap_or("").to_string();
    let flag = |field: &str| spec.get(field) == Some(&json!(true));
    let target = if text("targetNamespace").is_empty() { namespace.to_string() } else { text("targetNamespace") };
    let chart_ref = if text("repo").is_empty() { text("chart") } else { format!("{name}/{}", text("chart")) };
    let mut args = vec![json!(action)];
    if action == "install" {
        if !text("targetNamespace").is_empty() {
            args.extend([json!("--namespace"), json!(text("targetNamespace"))]);
        }
        if flag("createNamespace") {
            args.push(json!("--create-namespace"));
        }
        if !text("version").is_empty() {
            args.extend([json!("--version"), json!(text("version"))]);
        }
        if let Some(set) = spec.get("set").and_then(Value::as_object) {
            for (k, v) in set {
                let value = v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
                args.extend([json!("--set"), json!(format!("{k}={value}"))]);
            }
        }
    }
    let failure_policy = if text("failurePolicy").is_empty() { "reinstall".to_string() } else { text("failurePolicy") };
    let env = |k: &str, v: String| json!({"name": k, "value": v});
    let mut envs = vec![
        env("NAME", name.to_string()),
        env("VERSION", text("version")),
        env("REPO", text("repo")),
        env("HELM_DRIVER", "secret".into()),
        env("CHART_NAMESPACE", namespace.to_string()),
        env("CHART", chart_ref),
        env("HELM_VERSION", text("helmVersion")),
        env("TARGET_NAMESPACE", target),
        env("AUTH_PASS_CREDENTIALS", flag("authPassCredentials").to_string()),
        env("INSECURE_SKIP_TLS_VERIFY", flag("insecureSkipTLSVerify").to_string()),
        env("PLAIN_HTTP", flag("plainHTTP").to_string()),
    ];
    if !text("timeout").is_empty() {
        envs.push(env("TIMEOUT", text("timeout")));
    }
    envs.push(env("FAILURE_POLICY", failure_policy));
    // As helm-controller's hashObjects: the data of the chart-content ConfigMap, then of the
    // chart-values Secret, keys sorted.
    let mut hasher = Sha256::new();
    if !text("chartContent").is_empty() {
        hasher.update(format!("{name}.tgz.base64"));
        hasher.update(text("chartContent"));
    }
    for (k, v) in [("ca-file.pem", text("repoCA")), ("values-01_HelmChart.yaml", text("valuesContent"))] {
        if !v.is_empty() {
            hasher.update(k);
            hasher.update(v);
        }
    }
    let hash: String = hasher.finalize().iter().map(|b| format!("{b:02X}")).collect();
    let image = if text("jobImage").trim().is_empty() {
        "rancher/klipper-helm:v0.9.8-build20250709".to_string()
    } else {
        text("jobImage").trim().to_string()
    };
    let backoff = spec.get("backOffLimit").cloned().unwrap_or(json!(1000));
    json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {
            "name": format!("helm-{action}-{name}"), "namespace": namespace,
            "labels": {HELM_CHART_LABEL: name},
            "ownerReferences": [{"apiVersion": "helm.cattle.io/v1", "kind": "HelmChart", "name": name, "uid": uid,
                                 "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": {
            "backoffLimit": backoff, "completions": 1, "parallelism": 1,
            "template": {
                "metadata": {"annotations": {HELM_CONFIG_HASH_ANNOTATION: format!("SHA256={hash}")},
                    "labels": {HELM_CHART_LABEL: name}},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "serviceAccountName": format!("helm-{name}"),
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    "containers": [{"name": "helm", "image": image, "imagePullPolicy": "IfNotPresent", "args": args,
                        "env": envs}],
                },
            },
        },
    })
}

/// `controlPlane.statefulSet.highAvailability.replicas` from `spec.values` over `spec.valuesContent`.
pub(super) fn values_replicas(chart: &Value) -> u64 {
    let pointer = "/controlPlane/statefulSet/highAvailability/replicas";
    let as_count = |v: &Value| v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok()));
    if let Some(n) = chart.pointer("/spec/values").and_then(|v| v.pointer(pointer)).and_then(as_count) {
        return n;
    }
    chart
        .pointer("/spec/valuesContent")
        .and_then(Value::as_str)
        .and_then(|text| serde_norway::from_str::<Value>(text).ok())
        .and_then(|values| values.pointer(pointer).and_then(as_count))
        .unwrap_or(1)
}

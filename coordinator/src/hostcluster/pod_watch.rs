//! Watches the host cluster's Pods (all namespaces) and Nodes (their `spec.podCIDR`s) with kube-rs
//! watchers and hands what they see to the inventory's pod ownership ([`crate::pod_owners`]).
//!
//! A watcher (re)lists, then follows the watch from the list's resourceVersion; when the server
//! answers 410 Gone (the version is too old) it lists again. A list is handed over only once it is
//! complete ([`ApiChange::PodsListed`] at `InitDone`), so ownership never sees half a cluster.
//! Errors are retried with the watcher's default backoff and never stop the coordinator.

use std::net::IpAddr;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;

use hexa_shared::isolation::Ipv4Cidr;

use crate::inventory::Inventory;
use crate::pod_owners::{ApiChange, ApiPod, PodKey};

/// Annotation the kubelet puts on the mirror pods it creates for its static pods.
pub const MIRROR_POD_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// What ownership needs of a Pod; `None` for an object without a name.
pub fn api_pod(pod: &Pod) -> Option<(PodKey, ApiPod)> {
    let name = pod.metadata.name.clone()?;
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let mirror = pod.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(MIRROR_POD_ANNOTATION));
    let finished = status.and_then(|s| s.phase.as_deref()).is_some_and(|p| p == "Succeeded" || p == "Failed");
    let listed = status.and_then(|s| s.pod_ips.as_ref()).into_iter().flatten().map(|p| p.ip.as_str());
    let ip = status.and_then(|s| s.pod_ip.as_deref()).into_iter().chain(listed).find_map(|text| {
        match text.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => Some(v4),
            _ => None,
        }
    });
    let pod = ApiPod {
        namespace: namespace.clone(),
        node: spec.and_then(|s| s.node_name.clone()),
        ip,
        holds_ip: !host_network && !mirror && !finished,
    };
    Some(((namespace, name), pod))
}

/// A Node's name and its IPv4 pod ranges (`spec.podCIDRs`, or `spec.podCIDR`); ranges that do not
/// parse are left out.
pub fn node_ranges(node: &Node) -> Option<(String, Vec<Ipv4Cidr>)> {
    let name = node.metadata.name.clone()?;
    let spec = node.spec.as_ref();
    let listed = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    let single = spec.and_then(|s| s.pod_cidr.clone());
    let mut ranges: Vec<Ipv4Cidr> = listed.iter().chain(single.iter()).filter_map(|c| c.parse().ok()).collect();
    ranges.sort();
    ranges.dedup();
    Some((name, ranges))
}

/// One watcher's events as ownership changes, a complete list at a time.
struct Relay<T> {
    listing: Option<Vec<T>>,
}

impl<T> Relay<T> {
    fn new() -> Self {
        Relay { listing: None }
    }

    /// `Some` when `event` is something to hand over now.
    fn take<K>(
        &mut self,
        event: Event<K>,
        convert: impl Fn(&K) -> Option<T>,
        listed: impl FnOnce(Vec<T>) -> ApiChange,
        applied: impl FnOnce(T) -> ApiChange,
        deleted: impl FnOnce(T) -> ApiChange,
    ) -> Option<ApiChange> {
        match event {
            Event::Init => {
                self.listing = Some(Vec::new());
                None
            }
            Event::InitApply(object) => {
                let item = convert(&object)?;
                self.listing.get_or_insert_with(Vec::new).push(item);
                None
            }
            Event::InitDone => Some(listed(self.listing.take().unwrap_or_default())),
            Event::Apply(object) => convert(&object).map(applied),
            Event::Delete(object) => convert(&object).map(deleted),
        }
    }
}

/// Follows Pods and Nodes on `client` into `inventory` until `shutdown` changes.
pub async fn run(client: kube::Client, inventory: Arc<Inventory>, mut shutdown: watch::Receiver<bool>) {
    let pods = watcher::watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()).default_backoff();
    let nodes = watcher::watcher(Api::<Node>::all(client), watcher::Config::default()).default_backoff();
    let mut pods = std::pin::pin!(pods);
    let mut nodes = std::pin::pin!(nodes);
    let (mut pod_relay, mut node_relay) = (Relay::new(), Relay::new());
    loop {
        let change = tokio::select! {
            event = pods.next() => match event {
                Some(Ok(event)) => pod_relay.take(
                    event,
                    api_pod,
                    ApiChange::PodsListed,
                    |(key, pod)| ApiChange::PodApplied(key, pod),
                    |(key, _)| ApiChange::PodDeleted(key),
                ),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watching the host cluster's pods failed; retrying");
                    None
                }
                None => break,
            },
            event = nodes.next() => match event {
                Some(Ok(event)) => node_relay.take(
                    event,
                    node_ranges,
                    ApiChange::NodesListed,
                    |(name, ranges)| ApiChange::NodeApplied(name, ranges),
                    |(name, _)| ApiChange::NodeDeleted(name),
                ),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watching the host cluster's nodes failed; retrying");
                    None
                }
                None => break,
            },
            _ = shutdown.changed() => break,
        };
        if let Some(change) = change {
            if matches!(change, ApiChange::PodsListed(_) | ApiChange::NodesListed(_)) {
                tracing::info!(
                    what = if matches!(change, ApiChange::PodsListed(_)) { "pods" } else { "nodes" },
                    "host cluster listed; pod ownership follows it"
                );
            }
            inventory.pod_owners_api(change);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_pod_holds_its_ipv4_address_unless_on_the_host_network_mirrored_or_finished() {
        let base = json!({
            "metadata": {"name": "web", "namespace": "hx-acme"},
            "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": "fd00::5", "podIPs": [{"ip": "fd00::5"}, {"ip": "10.42.1.5"}]}
        });
        let ((ns, name), p) = api_pod(&pod(base.clone())).unwrap();
        assert_eq!((ns.as_str(), name.as_str()), ("hx-acme", "web"));
        assert_eq!(
            p,
            ApiPod {
                namespace: "hx-acme".into(),
                node: Some("n1".into()),
                ip: Some("10.42.1.5".parse().unwrap()),
                holds_ip: true
            }
        );
        let cases = [
            ("/spec/hostNetwork", json!(true)),
            ("/metadata/annotations", json!({MIRROR_POD_ANNOTATION: "abc"})),
            ("/status/phase", json!("Succeeded")),
            ("/status/phase", json!("Failed")),
        ];
        for (pointer, value) in cases {
            let mut v = base.clone();
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            let target = if parent.is_empty() { &mut v } else { v.pointer_mut(parent).unwrap() };
            target[key] = value;
            assert!(!api_pod(&pod(v)).unwrap().1.holds_ip, "{pointer}");
        }
        let pending = pod(json!({"metadata": {"name": "p", "namespace": "hx-acme"}}));
        assert_eq!(api_pod(&pending).unwrap().1.ip, None);
        assert!(api_pod(&pod(json!({"metadata": {}}))).is_none());
    }

    #[test]
    fn a_node_has_its_ipv4_pod_ranges() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n1"},
            "spec": {"podCIDR": "10.42.1.0/24", "podCIDRs": ["10.42.1.0/24", "fd00:1::/64", "bogus"]}
        }))
        .unwrap();
        assert_eq!(node_ranges(&node), Some(("n1".into(), vec!["10.42.1.0/24".parse().unwrap()])));
        let bare: Node = serde_json::from_value(json!({"metadata": {"name": "n2"}})).unwrap();
        assert_eq!(node_ranges(&bare), Some(("n2".into(), vec![])));
    }

    #[test]
    fn a_relisting_is_handed_over_whole_at_its_end() {
        let mut relay = Relay::new();
        let convert = |n: &u32| (*n != 0).then_some(*n);
        let mut take = |event: Event<u32>| {
            relay.take(
                event,
                convert,
                |all| ApiChange::NodesListed(all.into_iter().map(|n| (n.to_string(), vec![])).collect()),
                |n| ApiChange::NodeApplied(n.to_string(), vec![]),
                |n| ApiChange::NodeDeleted(n.to_string()),
            )
        };
        assert_eq!(take(Event::Init), None);
        assert_eq!(take(Event::InitApply(1)), None);
        assert_eq!(take(Event::InitApply(0)), None);
        assert_eq!(take(Event::InitApply(2)), None);
        let listed = ApiChange::NodesListed(vec![("1".into(), vec![]), ("2".into(), vec![])]);
        assert_eq!(take(Event::InitDone), Some(listed));
        assert_eq!(take(Event::Apply(3)), Some(ApiChange::NodeApplied("3".into(), vec![])));
        assert_eq!(take(Event::Delete(3)), Some(ApiChange::NodeDeleted("3".into())));
        assert_eq!(take(Event::Init), None);
        assert_eq!(take(Event::InitDone), Some(ApiChange::NodesListed(vec![])), "a relist of nothing empties");
    }
}

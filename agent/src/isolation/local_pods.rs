//! This node's own pods as the firewall needs them: which bridge port each pod sends from, and the
//! node's pod subnet. Only the node can know this, so it never comes from the coordinator; it is
//! read from the container runtime's record of each pod's network setup, the CNI result cache
//! (libcni writes one JSON file per pod interface under `<cache dir>/results/`, and removes it when
//! the pod's network is torn down).

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::io::Read as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use hexa_shared::isolation::Ipv4Cidr;
use serde::Deserialize;
use tracing::warn;

use super::firewall::LocalPods;

/// Where libcni (containerd, K3s) caches the result of each pod's network setup.
pub const DEFAULT_CNI_RESULTS_DIR: &str = "/var/lib/cni/results";
/// A result file larger than this is not a CNI result.
const MAX_RESULT_BYTES: u64 = 256 << 10;

/// Reads this node's pods' bridge ports.
pub trait LocalPodSource: Send + Sync + Debug {
    /// The local pods now. Files that cannot be read are skipped (and logged): the firewall then
    /// drops that pod's traffic until they can, which fails closed.
    fn local_pods(&self) -> LocalPods;
}

/// The CNI result cache of one bridge network.
#[derive(Debug, Clone)]
pub struct CniResults {
    dir: PathBuf,
    bridge: String,
}

impl CniResults {
    /// The results in `dir` of pods attached to `bridge`.
    pub fn new(dir: impl Into<PathBuf>, bridge: &str) -> CniResults {
        CniResults { dir: dir.into(), bridge: bridge.to_string() }
    }
}

impl LocalPodSource for CniResults {
    fn local_pods(&self) -> LocalPods {
        let mut pods = LocalPods { bridge: self.bridge.clone(), ..LocalPods::default() };
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            // No pod has been set up on this node yet.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return pods,
            Err(e) => {
                warn!(dir = %self.dir.display(), error = %e, "cannot list the CNI results; local pods' traffic is dropped");
                return pods;
            }
        };
        let mut subnets = BTreeSet::new();
        for entry in entries.flatten() {
            let path = entry.path();
            match read_result(&path) {
                Ok(cached) => {
                    for (ip, port, subnet) in cached.ports(&self.bridge) {
                        pods.ports.insert((ip, port));
                        subnets.extend(subnet);
                    }
                }
                Err(why) => warn!(file = %path.display(), %why, "skipping a CNI result; that pod's traffic is dropped"),
            }
        }
        // One bridge network has one subnet per node; if the results disagree, none is trusted.
        if subnets.len() == 1 {
            pods.pod_subnet = subnets.pop_first();
        } else if subnets.len() > 1 {
            warn!(?subnets, "the CNI results name several pod subnets; not guarding the node's own subnet");
        }
        pods
    }
}

fn read_result(path: &Path) -> Result<CachedResult, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = String::new();
    file.take(MAX_RESULT_BYTES + 1).read_to_string(&mut text).map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_RESULT_BYTES {
        return Err(format!("larger than {MAX_RESULT_BYTES} bytes"));
    }
    serde_json::from_str(&text).map_err(|e| e.to_string())
}

/// A libcni cache file (`kind: cniCacheV1`); only what is needed is read.
#[derive(Debug, Deserialize)]
struct CachedResult {
    #[serde(default)]
    result: Option<CniResult>,
}

#[derive(Debug, Deserialize)]
struct CniResult {
    #[serde(default)]
    interfaces: Vec<CniInterface>,
    #[serde(default)]
    ips: Vec<CniIp>,
}

#[derive(Debug, Deserialize)]
struct CniInterface {
    name: String,
    #[serde(default)]
    sandbox: String,
}

#[derive(Debug, Deserialize)]
struct CniIp {
    address: String,
    #[serde(default)]
    interface: Option<usize>,
}

impl CachedResult {
    /// `(pod address, bridge port, pod subnet)` for a result of the bridge plugin on `bridge`: its
    /// interfaces are the bridge, the host end of the pod's veth, and the pod's end (in the
    /// sandbox) that carries the addresses.
    fn ports(&self, bridge: &str) -> Vec<(Ipv4Addr, String, Option<Ipv4Cidr>)> {
        let Some(result) = &self.result else { return Vec::new() };
        if !result.interfaces.iter().any(|i| i.name == bridge && i.sandbox.is_empty()) {
            return Vec::new();
        }
        let host_ends: Vec<&CniInterface> =
            result.interfaces.iter().filter(|i| i.sandbox.is_empty() && i.name != bridge).collect();
        let [port] = host_ends.as_slice() else { return Vec::new() };
        result
            .ips
            .iter()
            .filter(|ip| ip.interface.and_then(|i| result.interfaces.get(i)).is_some_and(|i| !i.sandbox.is_empty()))
            .filter_map(|ip| {
                let (address, prefix) = ip.address.split_once('/')?;
                let address: Ipv4Addr = address.parse().ok()?;
                let prefix: u8 = prefix.parse().ok()?;
                let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix.min(32))) };
                let subnet = Ipv4Cidr::new(Ipv4Addr::from(u32::from(address) & mask), prefix).ok();
                Some((address, port.name.clone(), subnet))
            })
            .collect()
    }
}

#[cfg(any(test, feature = "testing"))]
/// A libcni cache file for a pod with `address` (`10.42.0.5/24`) on `bridge` through `port`, as
/// the bridge plugin's result reads.
pub fn cni_result_json(bridge: &str, port: &str, address: &str) -> String {
    serde_json::json!({
        "kind": "cniCacheV1",
        "containerId": format!("c-{port}"),
        "ifName": "eth0",
        "networkName": "cbr0",
        "result": {
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": bridge, "mac": "aa:bb:cc:00:00:01"},
                {"name": port, "mac": "aa:bb:cc:00:00:02"},
                {"name": "eth0", "mac": "aa:bb:cc:00:00:03", "sandbox": format!("/var/run/netns/cni-{port}")}
            ],
            "ips": [{"interface": 2, "address": address, "gateway": "10.42.0.1"}],
            "dns": {}
        }
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_on_the_bridge_are_read_with_their_ports_and_the_node_s_subnet() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("cbr0-a-eth0", &cni_result_json("cni0", "veth1", "10.42.3.5/24"));
        write("cbr0-b-eth0", &cni_result_json("cni0", "veth2", "10.42.3.6/24"));
        // Another network's pod, a torn file and an oversized one are not this bridge's pods.
        write("other-c-eth0", &cni_result_json("br-other", "veth3", "10.99.0.5/24"));
        write("cbr0-d-eth0", "{\"result\": {\"interfaces\": [");
        write("cbr0-e-eth0", &" ".repeat(MAX_RESULT_BYTES as usize + 10));
        let pods = CniResults::new(dir.path(), "cni0").local_pods();
        let want: BTreeSet<(Ipv4Addr, String)> =
            [("10.42.3.5".parse().unwrap(), "veth1".into()), ("10.42.3.6".parse().unwrap(), "veth2".into())].into();
        assert_eq!(pods.ports, want);
        assert_eq!(pods.pod_subnet, Some("10.42.3.0/24".parse().unwrap()));
        assert_eq!(pods.bridge, "cni0");
    }

    #[test]
    fn results_that_disagree_on_the_subnet_guard_none_and_a_missing_cache_is_no_pods() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), cni_result_json("cni0", "veth1", "10.42.3.5/24")).unwrap();
        std::fs::write(dir.path().join("b"), cni_result_json("cni0", "veth2", "10.42.4.5/24")).unwrap();
        let pods = CniResults::new(dir.path(), "cni0").local_pods();
        assert_eq!(pods.ports.len(), 2);
        assert_eq!(pods.pod_subnet, None);
        let none = CniResults::new(dir.path().join("missing"), "cni0").local_pods();
        assert!(none.ports.is_empty() && none.pod_subnet.is_none());
    }
}

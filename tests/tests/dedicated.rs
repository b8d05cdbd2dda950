//! The dedicated plan on Proxmox VMs: the coordinator clones, configures and starts VMs in the
//! Proxmox VE emulator, the VMs boot like cloud-init into real agents that enroll with their
//! Proxmox identity, and the nodes are bound to their tenant on the fake Kubernetes API server.

use std::time::Duration;

use hexa_shared::proto::ProviderIdentity;
use hexa_tests::dedicated::Env;
use hexa_tests::eventually;
use hexa_tests::pve::Timings;
use hexa_tests::pve::boot::{parse_serial, parse_smbios1};
use serde_json::{Value, json};

fn dedicated(class: &str, count: u32) -> Value {
    json!({"kind": "dedicated", "node_class": class, "count": count})
}

fn labels(node: &Value) -> serde_json::Map<String, Value> {
    node["metadata"]["labels"].as_object().cloned().unwrap_or_default()
}

fn tainted_for(node: &Value, tenant: &str) -> bool {
    node["spec"]["taints"].as_array().is_some_and(|t| {
        t.iter().any(|t| t["key"] == "hexabase.ai/dedicated" && t["value"] == tenant && t["effect"] == "NoSchedule")
    })
}

/// The seed URL a VM was given, from its `smbios1`.
fn seed_url(vm: &hexa_tests::pve::Vm) -> String {
    let fields = parse_smbios1(vm.config.get("smbios1").map(String::as_str).unwrap_or(""));
    parse_serial(&fields["serial"])["s"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedicated_tenant_gets_two_vms_that_enroll_with_their_identity_and_become_its_nodes() {
    let env = Env::start(Timings::fast(), |_| {}).await;
    env.create("acme", dedicated("S", 2)).await;
    let tenant = env.bound("acme", 2, Duration::from_secs(60)).await;

    // Two VMs, cloned from the S template, configured as the class says, running, tagged.
    let vms = env.pve.vms();
    assert_eq!(vms.len(), 2, "{vms:?}");
    let clones = env.pve.clones();
    assert_eq!(clones.len(), 2, "nothing cloned twice: {clones:?}");
    let nodes = env.c.admin.nodes().await;
    for vm in &vms {
        assert!(vm.running && vm.lock.is_none(), "{vm:?}");
        assert_eq!((vm.config["cores"].as_str(), vm.config["memory"].as_str()), ("4", "16384"), "{vm:?}");
        assert_eq!(vm.disk_gib, 200);
        assert_eq!(vm.config["onboot"], "1");
        let tags = &vm.config["tags"];
        assert!(tags.contains("hexabase") && tags.contains("hx-tenant-acme") && tags.contains("hx-rec-"), "{tags}");
        // The node that enrolled presented this VM's identity, and is the tenant's.
        let uuid = parse_smbios1(&vm.config["smbios1"])["uuid"].clone();
        let node = nodes
            .iter()
            .find(|n| n.provider == ProviderIdentity::Proxmox { vmid: vm.vmid, smbios_uuid: uuid.clone() })
            .unwrap_or_else(|| panic!("no node with VM {}'s identity in {nodes:?}", vm.vmid));
        assert!(tenant.placement.dedicated_nodes.contains(&node.name), "{tenant:?}");
        assert_eq!(node.node_class.as_deref(), Some("S"));
        assert_eq!(node.pool.to_string(), "dedicated:acme");
        // Its seed is no longer served.
        let seed = seed_url(vm);
        let status = reqwest::get(format!("{seed}user-data")).await.unwrap().status();
        assert_eq!(status, 404, "seed of a bound VM still served");
    }
    // Both nodes labelled and tainted for the tenant on the host cluster.
    eventually(Duration::from_secs(20), "nodes labelled and tainted", async || {
        tenant
            .placement
            .dedicated_nodes
            .iter()
            .all(|n| {
                env.kube.object("nodes", "", n).is_some_and(|o| {
                    labels(&o).get("tenant.hexabase.ai/acme") == Some(&json!("true"))
                        && labels(&o).get("hexabase.ai/pool") == Some(&json!("dedicated"))
                        && tainted_for(&o, "acme")
                })
            })
            .then_some(())
    })
    .await;
    env.make_ready("acme", Duration::from_secs(20)).await;
    assert_eq!(env.provisioning().await, json!([]));
    // Every node's tokens are used: none of the VMs' tokens is left usable.
    let (_, tokens) = env.c.admin.request(reqwest::Method::GET, "/v1/tokens", None).await;
    assert!(tokens.as_array().unwrap().iter().all(|t| t["status"] == "used"), "{tokens}");
    env.stop().await;
}

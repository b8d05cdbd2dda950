use super::*;
use hexa_shared::proto::ProviderIdentity;

fn record(id: &str, state: VmState, created: u64) -> VmRecord {
    VmRecord {
        id: id.into(),
        tenant: "acme".into(),
        node_class: "S".into(),
        state,
        created_unix_ms: created,
        state_since_unix_ms: created,
        not_before_unix_ms: 0,
        pve_node: Some("pve1".into()),
        vmid: Some(100),
        upid: None,
        smbios_uuid: random_uuid(),
        seed_id: None,
        token_id: None,
        token_secret: None,
        retire: None,
        last_error: None,
        generation: 0,
    }
}

#[test]
fn surplus_takes_unbound_vms_then_nodes_placement_let_go() {
    let a = record("aaaaaaaaaa", VmState::Bound, 1);
    let b = record("bbbbbbbbbb", VmState::Bound, 2);
    let c = record("cccccccccc", VmState::Cloning, 3);
    let d = record("dddddddddd", VmState::WaitingForRegistration, 4);
    let all = [&a, &b, &c, &d];
    let held = vec![a.node_name(), b.node_name()];
    // (wanted, nodes placement holds) -> records to retire
    let cases: [(usize, Vec<String>, Vec<&str>); 5] = [
        (4, held.clone(), vec![]),
        (3, held.clone(), vec!["dddddddddd"]),
        (2, held.clone(), vec!["dddddddddd", "cccccccccc"]),
        // Placement let go of a's node: a goes before b.
        (1, vec![b.node_name()], vec!["dddddddddd", "cccccccccc", "aaaaaaaaaa"]),
        (0, held.clone(), vec!["dddddddddd", "cccccccccc", "bbbbbbbbbb", "aaaaaaaaaa"]),
    ];
    for (wanted, held, expected) in cases {
        assert_eq!(surplus(&all, wanted, &held), expected, "wanted {wanted}, held {held:?}");
    }
}

#[test]
fn records_tag_and_name_their_vm() {
    let r = record("k3v9q2m1xz", VmState::Requested, 0);
    assert_eq!(r.vm_name(), "hx-k3v9q2m1xz");
    assert_eq!(r.tags(&["rack-3".into()]), "hexabase;hx-tenant-acme;hx-rec-k3v9q2m1xz;rack-3");
    assert_eq!(r.identity(), Some(ProviderIdentity::Proxmox { vmid: 100, smbios_uuid: r.smbios_uuid.clone() }));
    let uuid = random_uuid();
    assert_eq!(uuid.len(), 36);
    assert_eq!(&uuid[14..15], "4", "a version 4 uuid: {uuid}");
    assert_eq!(VmState::WaitingForRegistration.to_string(), "waiting_for_registration");
}

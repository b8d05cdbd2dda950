//! Feeds arbitrary text to what `hexa-agent apply --spec FILE` does with the file before it touches
//! the node: the JSON is read as a `NodeSpec`, checked (`apply::check`), its isolation turned into
//! the firewall state it asks for and its K3s part validated and rendered. Holds:
//! - nothing panics or allocates past the cap;
//! - a spec that reads survives the round trip through the JSON the agent records it in;
//! - the firewall batch a checked spec renders, applied to an in-memory kernel, reads back through
//!   the `iptables-save`/`ipset save` parser as exactly the state it was rendered from, and a second
//!   reconcile finds nothing to do;
//! - a valid K3s part renders a config that is one YAML mapping (or empty) and an environment file with one
//!   line per variable, whatever its strings hold.
#![no_main]

use hexa_agent::apply;
use hexa_agent::isolation::firewall::{Firewall, LocalPods, MemoryFirewall, Reconciled, Ruleset, plan, reconcile};
use hexa_agent::k3s::render;
use hexa_shared::spec::NodeSpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The agent reads the file as UTF-8 text, then as JSON.
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(spec) = serde_json::from_str::<NodeSpec>(text) else { return };
    let recorded = serde_json::to_vec_pretty(&spec).expect("a spec serialises");
    let back: NodeSpec = serde_json::from_slice(&recorded).expect("the recorded spec reads back");
    assert_eq!(back, spec, "round trip through the recorded JSON changed the spec");

    if apply::check(&spec).is_err() {
        return;
    }
    if let Some(isolation) = &spec.isolation {
        if let Ok(desired) = Ruleset::desired(isolation, &LocalPods::default()) {
            let kernel = MemoryFirewall::new();
            let outcome = reconcile(&kernel, &desired).expect("a rendered batch applies to an empty firewall");
            assert!(matches!(outcome, Reconciled::Applied { .. }), "{outcome:?}");
            let current = kernel.current().expect("the in-memory kernel reads back");
            assert_eq!(current, desired, "the rendered state did not read back as itself");
            assert!(plan(&desired, &current).is_none(), "nothing is left to do");
            assert_eq!(reconcile(&kernel, &desired).expect("second reconcile"), Reconciled::Unchanged);
        }
    }
    if let Some(k3s) = &spec.k3s {
        if k3s.validate().is_ok() {
            // K3s reads the config as YAML: whatever the spec's strings hold, it stays one mapping
            // (or nothing but comments, when the spec sets no flag).
            let config = render::config_yaml(k3s);
            let yaml: serde_norway::Value = serde_norway::from_str(&config).expect("config.yaml is YAML");
            assert!(yaml.is_mapping() || yaml.is_null(), "config.yaml is not a mapping:\n{config}");
            // systemd reads the environment file a line per variable: no value adds a variable.
            let env = render::env_file(k3s);
            assert_eq!(env.lines().count(), 1 + k3s.environment.len(), "{env}");
            assert_eq!(render::desired_files(k3s).len(), 3);
        }
    }
});

//! The firewall of `hexa-agent apply --root`: the node's own firewall is not touched. The batch a
//! reconcile would apply is printed instead, and the firewall then reads back as the spec's rules,
//! as if the batch had been applied, so that the reconcile completes as it would on the node.

use std::fmt;
use std::io::Write;
use std::sync::{Mutex, MutexGuard};

use hexa_shared::isolation::IsolationSpec;

use super::firewall::{Batch, Firewall, FirewallError, LocalPods, Ruleset};

/// A dry run towards one isolation spec, on a node where nothing of ours exists yet.
pub struct DryRunFirewall {
    /// What the firewall reads back as: nothing of ours until a batch "is applied", then `target`.
    state: Mutex<Ruleset>,
    target: Ruleset,
    out: Mutex<Box<dyn Write + Send>>,
}

impl fmt::Debug for DryRunFirewall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DryRunFirewall").field("target_rules", &self.target.rule_count()).finish_non_exhaustive()
    }
}

impl DryRunFirewall {
    /// A dry run of `isolation` on a node whose pods are `local`, that prints on standard output.
    pub fn new(isolation: Option<&IsolationSpec>, local: &LocalPods) -> Result<DryRunFirewall, FirewallError> {
        DryRunFirewall::with_output(isolation, local, Box::new(std::io::stdout()))
    }

    /// A dry run of `isolation` that prints to `out`.
    pub fn with_output(
        isolation: Option<&IsolationSpec>,
        local: &LocalPods,
        out: Box<dyn Write + Send>,
    ) -> Result<DryRunFirewall, FirewallError> {
        let target = isolation.map(|spec| Ruleset::desired(spec, local)).transpose()?.unwrap_or_default();
        Ok(DryRunFirewall { state: Mutex::new(Ruleset::default()), target, out: Mutex::new(out) })
    }

    fn state(&self) -> MutexGuard<'_, Ruleset> {
        // A panic elsewhere while holding the lock leaves plain data behind; keep using it.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Firewall for DryRunFirewall {
    fn current(&self) -> Result<Ruleset, FirewallError> {
        Ok(self.state().clone())
    }

    fn apply(&self, batch: &Batch) -> Result<(), FirewallError> {
        let mut out = self.out.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        writeln!(out, "would apply this firewall batch:\n{batch}").map_err(|e| FirewallError::Command {
            command: "firewall dry run".into(),
            status: "not printed".into(),
            stderr: e.to_string(),
            detail: String::new(),
        })?;
        *self.state() = self.target.clone();
        Ok(())
    }

    /// A dry run leaves the node's settings alone.
    fn ensure_bridge_filtering(&self) -> Result<bool, FirewallError> {
        Ok(false)
    }
}

#[cfg(test)]
mod tests {

    use hexa_shared::isolation::TenantIsolation;

    use super::*;
    use crate::isolation::firewall::{Reconciled, reconcile_spec, render};

    use crate::printed::Printed;

    #[test]
    fn prints_the_whole_batch_once_and_then_has_no_drift() {
        let spec = IsolationSpec {
            pod_cidr: "10.42.0.0/16".parse().unwrap(),
            management_cidrs: vec!["192.168.100.10".parse().unwrap()],
            system_pod_ips: ["10.42.0.53".parse().unwrap()].into(),
            tenants: vec![TenantIsolation { tenant: "acme".into(), pod_ips: ["10.42.0.11".parse().unwrap()].into() }],
            node_addresses: Default::default(),
            node_services: Vec::new(),
        };
        let local = LocalPods::default();
        let printed = Printed::default();
        let firewall = DryRunFirewall::with_output(Some(&spec), &local, Box::new(printed.clone())).unwrap();
        assert!(matches!(reconcile_spec(&firewall, &spec, &local).unwrap(), Reconciled::Applied { .. }));
        assert_eq!(reconcile_spec(&firewall, &spec, &local).unwrap(), Reconciled::Unchanged);
        let text = printed.text();
        let batch = render(&Ruleset::desired(&spec, &local).unwrap());
        assert_eq!(text, format!("would apply this firewall batch:\n{batch}\n"));
        assert!(text.contains("hx-sys") && text.contains("HEXA-FWD"), "{text}");
    }
}

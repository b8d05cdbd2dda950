//! Comparing a desired [`Ruleset`] with the current one ([`drift`]) and rendering the one [`Batch`]
//! that turns the current into the desired ([`plan()`]).

use std::collections::BTreeSet;
use std::fmt::{self, Write as _};

use hexa_shared::isolation::MAX_IPS_PER_SET;

use super::NEW_SUFFIX;
use super::ruleset::{IpSet, Ruleset};

/// What differs between the desired and the current state, one readable item per difference.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Drift(pub Vec<String>);

impl Drift {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() { f.write_str("no drift") } else { f.write_str(&self.0.join("; ")) }
    }
}

/// Lists the differences; empty exactly when `desired == current`.
pub fn drift(desired: &Ruleset, current: &Ruleset) -> Drift {
    let mut items = Vec::new();
    for (name, want) in &desired.sets {
        match current.sets.get(name) {
            None => items.push(format!("set {name} missing")),
            Some(have) if have != want => {
                let missing: Vec<String> = want.members.difference(&have.members).map(|ip| ip.to_string()).collect();
                let extra: Vec<String> = have.members.difference(&want.members).map(|ip| ip.to_string()).collect();
                let mut item = format!("set {name}:");
                if have.kind != want.kind {
                    let _ = write!(item, " is {} instead of {},", have.kind, want.kind);
                }
                let _ = write!(item, " members {} missing{}", missing.len(), sample(&missing));
                let _ = write!(item, ", {} unexpected{}", extra.len() + have.other_entries.len(), sample(&extra));
                items.push(item);
            }
            Some(_) => {}
        }
    }
    items.extend(current.sets.keys().filter(|n| !desired.sets.contains_key(*n)).map(|n| format!("unexpected set {n}")));
    for (chain, want) in &desired.chains {
        match current.chains.get(chain) {
            None => items.push(format!("chain {chain} missing")),
            Some(have) if have != want => {
                let missing = want.iter().filter(|r| !have.contains(r)).count();
                let extra = have.iter().filter(|r| !want.contains(r)).count();
                items.push(if missing + extra == 0 {
                    format!("chain {chain}: rules out of order")
                } else {
                    format!("chain {chain}: rules {missing} missing, {extra} unexpected")
                });
            }
            Some(_) => {}
        }
    }
    items.extend(
        current.chains.keys().filter(|c| !desired.chains.contains_key(*c)).map(|c| format!("unexpected chain {c}")),
    );
    for jump in desired.jumps.difference(&current.jumps) {
        items.push(format!("jump {} {} not rule {}", jump.chain, jump.rule, jump.position + 1));
    }
    for jump in current.jumps.difference(&desired.jumps) {
        items.push(format!("unexpected jump {} {} at rule {}", jump.chain, jump.rule, jump.position + 1));
    }
    Drift(items)
}

fn sample(ips: &[String]) -> String {
    match ips.len() {
        0 => String::new(),
        1..=3 => format!(" ({})", ips.join(", ")),
        _ => format!(" ({}, ...)", ips[..3].join(", ")),
    }
}

/// The three inputs of one apply, run in this order. An empty text means that step is skipped.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Batch {
    /// `ipset restore`: creates and fills new sets, rebuilds and swaps changed ones.
    pub ipset_prepare: String,
    /// `iptables-restore --noflush`: one transaction on the filter table.
    pub iptables: String,
    /// `ipset restore`: destroys the sets no rule refers to any more.
    pub ipset_cleanup: String,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.ipset_prepare.is_empty() && self.iptables.is_empty() && self.ipset_cleanup.is_empty()
    }
}

impl fmt::Display for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# 1. ipset restore")?;
        f.write_str(&self.ipset_prepare)?;
        writeln!(f, "# 2. iptables-restore --noflush")?;
        f.write_str(&self.iptables)?;
        writeln!(f, "# 3. ipset restore")?;
        f.write_str(&self.ipset_cleanup)
    }
}

/// The whole desired state as one batch, for a node where nothing of ours exists yet.
pub fn render(desired: &Ruleset) -> Batch {
    plan(desired, &Ruleset::default()).unwrap_or_default()
}

/// The batch that turns `current` into `desired`, or `None` when they are already equal. Touches only
/// what differs: unchanged sets are not rebuilt, unchanged chains not rewritten, correct jumps kept.
pub fn plan(desired: &Ruleset, current: &Ruleset) -> Option<Batch> {
    if desired == current {
        return None;
    }
    let mut batch = Batch::default();
    let prepare = &mut batch.ipset_prepare;
    let mut destroyed = BTreeSet::new();
    for (name, want) in &desired.sets {
        match current.sets.get(name) {
            Some(have) if have == want => {}
            Some(_) => {
                let staging = format!("{name}{NEW_SUFFIX}");
                if current.sets.contains_key(&staging) {
                    let _ = writeln!(prepare, "destroy {staging}");
                    destroyed.insert(staging.clone());
                }
                create_set(prepare, &staging, want);
                let _ = writeln!(prepare, "swap {staging} {name}");
                let _ = writeln!(prepare, "destroy {staging}");
            }
            None => create_set(prepare, name, want),
        }
    }

    if desired.chains != current.chains || desired.jumps != current.jumps {
        let out = &mut batch.iptables;
        out.push_str("*filter\n");
        let rewrite: Vec<(&String, &Vec<String>)> =
            desired.chains.iter().filter(|(chain, rules)| current.chains.get(*chain) != Some(*rules)).collect();
        let stale: Vec<&String> = current.chains.keys().filter(|c| !desired.chains.contains_key(*c)).collect();
        // Declaring a chain creates it, or flushes it when it exists (also with --noflush).
        for chain in rewrite.iter().map(|(c, _)| *c).chain(stale.iter().copied()) {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        if desired.jumps != current.jumps {
            for jump in &current.jumps {
                let _ = writeln!(out, "-D {} {}", jump.chain, jump.rule);
            }
            for jump in &desired.jumps {
                let _ = writeln!(out, "-I {} {} {}", jump.chain, jump.position + 1, jump.rule);
            }
        }
        for (chain, rules) in rewrite {
            for rule in rules {
                let _ = writeln!(out, "-A {chain} {rule}");
            }
        }
        for chain in stale {
            let _ = writeln!(out, "-X {chain}");
        }
        out.push_str("COMMIT\n");
    }

    for name in current.sets.keys() {
        if !desired.sets.contains_key(name) && !destroyed.contains(name) {
            let _ = writeln!(batch.ipset_cleanup, "destroy {name}");
        }
    }
    Some(batch)
}

fn create_set(out: &mut String, name: &str, set: &IpSet) {
    let _ = writeln!(out, "create {name} hash:ip family inet hashsize 1024 maxelem {MAX_IPS_PER_SET}");
    for ip in &set.members {
        let _ = writeln!(out, "add {name} {ip}");
    }
}

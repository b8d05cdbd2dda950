//! Comparing a desired [`Ruleset`] with the current one ([`drift`]) and rendering the one [`Batch`]
//! that turns the current into the desired ([`plan()`]).

use std::collections::BTreeSet;
use std::fmt::{self, Write as _};

use hexa_shared::isolation::MAX_IPS_PER_SET;

use super::NEW_SUFFIX;
use super::ruleset::{ChainRef, Family, IpSet, Ruleset, Table};

/// What differs between the desired and the current state, one readable item per difference.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Drift(pub Vec<String>);

impl Drift {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Whether the only difference is where our jumps are: another program put rules before them, or
/// took them out, while our chains and sets stayed as they were. A reconcile that repairs this is
/// a fight with that program, not a change of ours.
pub fn displaced(desired: &Ruleset, current: &Ruleset) -> bool {
    desired.chains == current.chains && desired.sets == current.sets && desired.jumps != current.jumps
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
                let missing: Vec<String> = want.members.difference(&have.members).map(|m| m.to_string()).collect();
                let extra: Vec<String> = have.members.difference(&want.members).map(|m| m.to_string()).collect();
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

/// The four inputs of one apply, run in this order. An empty text means that step is skipped.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Batch {
    /// `ipset restore`: creates and fills new sets, rebuilds and swaps changed ones.
    pub ipset_prepare: String,
    /// `iptables-restore --noflush`: one transaction per table (mangle, and filter to remove what
    /// older agents left there).
    pub iptables: String,
    /// `ip6tables-restore --noflush`: the same for IPv6.
    pub ip6tables: String,
    /// `ipset restore`: destroys the sets no rule refers to any more.
    pub ipset_cleanup: String,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.ipset_prepare.is_empty()
            && self.iptables.is_empty()
            && self.ip6tables.is_empty()
            && self.ipset_cleanup.is_empty()
    }
}

impl fmt::Display for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# 1. ipset restore")?;
        f.write_str(&self.ipset_prepare)?;
        writeln!(f, "# 2. iptables-restore --noflush")?;
        f.write_str(&self.iptables)?;
        writeln!(f, "# 3. ip6tables-restore --noflush")?;
        f.write_str(&self.ip6tables)?;
        writeln!(f, "# 4. ipset restore")?;
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

    for family in [Family::V4, Family::V6] {
        let out = match family {
            Family::V4 => &mut batch.iptables,
            Family::V6 => &mut batch.ip6tables,
        };
        for table in [Table::Mangle, Table::Filter] {
            render_table(out, desired, current, family, table);
        }
    }

    for name in current.sets.keys() {
        if !desired.sets.contains_key(name) && !destroyed.contains(name) {
            let _ = writeln!(batch.ipset_cleanup, "destroy {name}");
        }
    }
    Some(batch)
}

/// One table's transaction (`*table` ... `COMMIT`), when anything of ours in it differs: the
/// chains that differ rewritten (declaring a chain creates it, or flushes it when it exists, also
/// with `--noflush`), our jumps put back in place, stale chains deleted.
fn render_table(out: &mut String, desired: &Ruleset, current: &Ruleset, family: Family, table: Table) {
    let here = |chain: &ChainRef| chain.family == family && chain.table == table;
    let want: Vec<(&ChainRef, &Vec<String>)> = desired.chains.iter().filter(|(c, _)| here(c)).collect();
    let rewrite: Vec<(&ChainRef, &Vec<String>)> =
        want.iter().copied().filter(|(chain, rules)| current.chains.get(*chain) != Some(*rules)).collect();
    let stale: Vec<&ChainRef> = current.chains.keys().filter(|c| here(c) && !desired.chains.contains_key(*c)).collect();
    let want_jumps: Vec<_> = desired.jumps.iter().filter(|j| here(&j.chain)).collect();
    let have_jumps: Vec<_> = current.jumps.iter().filter(|j| here(&j.chain)).collect();
    if rewrite.is_empty() && stale.is_empty() && want_jumps == have_jumps {
        return;
    }
    let _ = writeln!(out, "*{}", table.name());
    for chain in rewrite.iter().map(|(c, _)| *c).chain(stale.iter().copied()) {
        let _ = writeln!(out, ":{} - [0:0]", chain.name);
    }
    if want_jumps != have_jumps {
        for jump in &have_jumps {
            let _ = writeln!(out, "-D {} {}", jump.chain.name, jump.rule);
        }
        for jump in &want_jumps {
            let _ = writeln!(out, "-I {} {} {}", jump.chain.name, jump.position + 1, jump.rule);
        }
    }
    for (chain, rules) in rewrite {
        for rule in rules {
            let _ = writeln!(out, "-A {} {rule}", chain.name);
        }
    }
    for chain in stale {
        let _ = writeln!(out, "-X {}", chain.name);
    }
    out.push_str("COMMIT\n");
}

fn create_set(out: &mut String, name: &str, set: &IpSet) {
    let _ = writeln!(out, "create {name} {} hashsize 1024 maxelem {MAX_IPS_PER_SET}", set.kind);
    for member in &set.members {
        let _ = writeln!(out, "add {name} {member}");
    }
}

//! An in-memory firewall for tests and dry runs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use super::plan::Batch;
use super::ruleset::{Family, Ruleset, Table, normalize_rule};
use super::{CHAIN_PREFIX, Firewall, FirewallError};

/// An in-memory kernel firewall (the mangle and filter tables of IPv4 and IPv6, the ipset store and
/// the bridge netfilter settings) that interprets the batch language we emit with the kernel's
/// rules: an iptables transaction is all or nothing per `COMMIT`; `ipset restore` stops at the first
/// failing line; a set referenced by a rule cannot be destroyed; a chain that is referenced or not
/// empty cannot be deleted. `current` goes through the same parser as the real thing.
#[derive(Debug, Default)]
pub struct MemoryFirewall {
    state: Mutex<MemoryState>,
}

type Chains = Vec<(String, Vec<String>)>;

#[derive(Debug, Clone)]
struct MemoryState {
    /// Every chain of each family's tables, built-in ones first, with its rules.
    tables: BTreeMap<(Family, Table), Chains>,
    sets: BTreeMap<String, (String, Vec<String>)>,
    bridge_filtering: bool,
}

fn builtin(table: Table) -> &'static [&'static str] {
    match table {
        Table::Mangle => &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"],
        Table::Filter => &["INPUT", "FORWARD", "OUTPUT"],
    }
}

impl Default for MemoryState {
    fn default() -> Self {
        let mut tables = BTreeMap::new();
        for family in [Family::V4, Family::V6] {
            for table in [Table::Mangle, Table::Filter] {
                tables.insert((family, table), builtin(table).iter().map(|c| (c.to_string(), Vec::new())).collect());
            }
        }
        MemoryState { tables, sets: BTreeMap::new(), bridge_filtering: false }
    }
}

impl MemoryState {
    fn set_in_use(&self, set: &str) -> bool {
        self.tables.values().flatten().flat_map(|(_, rules)| rules).any(|r| r.split_whitespace().any(|w| w == set))
    }
}

fn chain<'a>(chains: &'a mut Chains, name: &str) -> Option<&'a mut Vec<String>> {
    chains.iter_mut().find(|(n, _)| n == name).map(|(_, rules)| rules)
}

impl MemoryFirewall {
    pub fn new() -> MemoryFirewall {
        MemoryFirewall::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The IPv4 tables as `iptables-save` would print them.
    pub fn iptables_save(&self) -> String {
        self.save(Family::V4)
    }

    /// The IPv6 tables as `ip6tables-save` would print them.
    pub fn ip6tables_save(&self) -> String {
        self.save(Family::V6)
    }

    fn save(&self, family: Family) -> String {
        let state = self.lock();
        let mut out = String::new();
        for table in [Table::Mangle, Table::Filter] {
            let chains = &state.tables[&(family, table)];
            let _ = writeln!(out, "*{}", table.name());
            for (name, _) in chains {
                let policy = if builtin(table).contains(&name.as_str()) { "ACCEPT" } else { "-" };
                let _ = writeln!(out, ":{name} {policy} [0:0]");
            }
            for (name, rules) in chains {
                for rule in rules {
                    let _ = writeln!(out, "-A {name} {rule}");
                }
            }
            out.push_str("COMMIT\n");
        }
        out
    }

    /// The sets as `ipset save` would print them.
    pub fn ipset_save(&self) -> String {
        let state = self.lock();
        let mut out = String::new();
        for (name, (kind, entries)) in &state.sets {
            let _ = writeln!(out, "create {name} {kind} hashsize 1024 maxelem 65536 bucketsize 12 initval 0x1");
            for entry in entries {
                let _ = writeln!(out, "add {name} {entry}");
            }
        }
        out
    }

    /// Runs `iptables-restore --noflush` input; all or nothing per `COMMIT`.
    pub fn exec_iptables(&self, input: &str) -> Result<(), FirewallError> {
        self.exec_tables(Family::V4, input)
    }

    /// Runs `ip6tables-restore --noflush` input.
    pub fn exec_ip6tables(&self, input: &str) -> Result<(), FirewallError> {
        self.exec_tables(Family::V6, input)
    }

    fn exec_tables(&self, family: Family, input: &str) -> Result<(), FirewallError> {
        let mut guard = self.lock();
        let mut work = guard.clone();
        let mut table = None;
        for (number, line) in input.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
            let fail = |why: &str| FirewallError::Command {
                command: "iptables-restore --noflush (memory)".into(),
                status: "exit status: 1".into(),
                stderr: format!("line {number}: {why}"),
                detail: format!("; the failing input line was: {line}"),
            };
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('*') {
                table = Some(Table::parse(name).ok_or_else(|| fail("table does not exist"))?);
                continue;
            }
            let Some(table) = table else { return Err(fail("no table given")) };
            if line == "COMMIT" {
                *guard = work.clone();
                continue;
            }
            let sets: Vec<String> = work.sets.keys().cloned().collect();
            let chains = work.tables.get_mut(&(family, table)).ok_or_else(|| fail("no such table"))?;
            if let Some(declaration) = line.strip_prefix(':') {
                let name = declaration.split_whitespace().next().unwrap_or_default();
                let is_builtin = builtin(table).contains(&name);
                match chain(chains, name) {
                    Some(rules) if !is_builtin => rules.clear(),
                    Some(_) => {}
                    None => chains.push((name.to_string(), Vec::new())),
                }
                continue;
            }
            let mut words = line.splitn(3, ' ');
            let (op, name, rest) =
                (words.next().unwrap_or_default(), words.next().unwrap_or_default(), words.next().unwrap_or_default());
            let rule = normalize_rule(rest);
            let check_refs = |chains: &Chains, rule: &str| -> Result<(), FirewallError> {
                let words: Vec<&str> = rule.split_whitespace().collect();
                for w in words.windows(2) {
                    if w[0] == "--match-set" && !sets.iter().any(|s| s == w[1]) {
                        return Err(fail(&format!("set {} does not exist", w[1])));
                    }
                    if matches!(w[0], "-j" | "-g")
                        && w[1].starts_with(CHAIN_PREFIX)
                        && !chains.iter().any(|(n, _)| n == w[1])
                    {
                        return Err(fail(&format!("chain {} does not exist", w[1])));
                    }
                }
                Ok(())
            };
            match op {
                "-A" => {
                    check_refs(chains, &rule)?;
                    chain(chains, name).ok_or_else(|| fail("no such chain"))?.push(rule);
                }
                "-I" => {
                    let (position, rule) = match rest.split_once(' ').map(|(n, r)| (n.parse::<usize>(), r)) {
                        Some((Ok(n), r)) => (n, normalize_rule(r)),
                        _ => (1, rule.clone()),
                    };
                    check_refs(chains, &rule)?;
                    let rules = chain(chains, name).ok_or_else(|| fail("no such chain"))?;
                    if position == 0 || position > rules.len() + 1 {
                        return Err(fail("index of insertion too big"));
                    }
                    rules.insert(position - 1, rule);
                }
                "-D" => {
                    let rules = chain(chains, name).ok_or_else(|| fail("no such chain"))?;
                    let at = rules.iter().position(|r| *r == rule).ok_or_else(|| fail("no such rule"))?;
                    rules.remove(at);
                }
                "-F" => chain(chains, name).ok_or_else(|| fail("no such chain"))?.clear(),
                "-X" => {
                    let referenced = chains.iter().flat_map(|(_, r)| r).any(|r| {
                        r.split_whitespace()
                            .collect::<Vec<_>>()
                            .windows(2)
                            .any(|w| matches!(w[0], "-j" | "-g") && w[1] == name)
                    });
                    match chain(chains, name) {
                        None => return Err(fail("no such chain")),
                        Some(rules) if !rules.is_empty() => return Err(fail("chain is not empty")),
                        Some(_) if referenced => return Err(fail("chain is referenced")),
                        Some(_) => chains.retain(|(n, _)| n != name),
                    }
                }
                _ => return Err(fail("unknown command")),
            }
        }
        Ok(())
    }

    /// Runs `ipset restore` input, line by line, stopping at the first error like the real tool.
    pub fn exec_ipset(&self, input: &str) -> Result<(), FirewallError> {
        let mut state = self.lock();
        for (number, line) in input.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
            let fail = |why: &str| FirewallError::Command {
                command: "ipset restore (memory)".into(),
                status: "exit status: 1".into(),
                stderr: format!("Error in line {number}: {why}"),
                detail: format!("; the failing input line was: {line}"),
            };
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                [] => {}
                ["create", name, kind, rest @ ..] => {
                    if state.sets.contains_key(*name) {
                        return Err(fail("Set cannot be created: set with the same name already exists"));
                    }
                    let family = rest.windows(2).find(|w| w[0] == "family").map(|w| w[1]).unwrap_or("inet");
                    state.sets.insert(name.to_string(), (format!("{kind} family {family}"), Vec::new()));
                }
                ["add", name, entry] | ["del", name, entry] => {
                    let (_, entries) =
                        state.sets.get_mut(*name).ok_or_else(|| fail("The set with the given name does not exist"))?;
                    let present = entries.iter().position(|e| e == entry);
                    match (words[0], present) {
                        ("add", None) => entries.push(entry.to_string()),
                        ("add", Some(_)) => return Err(fail("Element cannot be added to the set: it's already added")),
                        (_, Some(at)) => {
                            entries.remove(at);
                        }
                        (_, None) => return Err(fail("Element cannot be deleted from the set: it's not added")),
                    }
                }
                ["swap", from, to] => {
                    let (Some(a), Some(b)) = (state.sets.get(*from).cloned(), state.sets.get(*to).cloned()) else {
                        return Err(fail("The set with the given name does not exist"));
                    };
                    if a.0 != b.0 {
                        return Err(fail("The sets cannot be swapped: their type does not match"));
                    }
                    state.sets.insert(from.to_string(), b);
                    state.sets.insert(to.to_string(), a);
                }
                ["destroy", name] => {
                    if !state.sets.contains_key(*name) {
                        return Err(fail("The set with the given name does not exist"));
                    }
                    if state.set_in_use(name) {
                        return Err(fail("Set cannot be destroyed: it is in use by a kernel component"));
                    }
                    state.sets.remove(*name);
                }
                ["flush", name] => {
                    state
                        .sets
                        .get_mut(*name)
                        .ok_or_else(|| fail("The set with the given name does not exist"))?
                        .1
                        .clear();
                }
                _ => return Err(fail("unknown command")),
            }
        }
        Ok(())
    }
}

impl Firewall for MemoryFirewall {
    fn current(&self) -> Result<Ruleset, FirewallError> {
        Ruleset::from_saves(&self.iptables_save(), &self.ip6tables_save(), &self.ipset_save())
    }

    fn apply(&self, batch: &Batch) -> Result<(), FirewallError> {
        self.exec_ipset(&batch.ipset_prepare)?;
        self.exec_iptables(&batch.iptables)?;
        self.exec_ip6tables(&batch.ip6tables)?;
        self.exec_ipset(&batch.ipset_cleanup)
    }

    fn ensure_bridge_filtering(&self) -> Result<bool, FirewallError> {
        let mut state = self.lock();
        Ok(!std::mem::replace(&mut state.bridge_filtering, true))
    }
}

//! An in-memory firewall for tests and dry runs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use super::plan::Batch;
use super::ruleset::{Ruleset, normalize_rule};
use super::{CHAIN_PREFIX, Firewall, FirewallError};

/// An in-memory filter table and ipset store that interprets the batch language we emit with the
/// kernel's rules: an iptables transaction is all or nothing; `ipset restore` stops at the first
/// failing line; a set referenced by a rule cannot be destroyed; a chain that is referenced or not
/// empty cannot be deleted. `current` goes through the same parser as the real thing.
#[derive(Debug, Default)]
pub struct MemoryFirewall {
    state: Mutex<MemoryState>,
}

#[derive(Debug, Clone)]
struct MemoryState {
    /// Every chain of the filter table, built-in ones first, with its rules.
    chains: Vec<(String, Vec<String>)>,
    sets: BTreeMap<String, (String, Vec<String>)>,
}

impl Default for MemoryState {
    fn default() -> Self {
        MemoryState {
            chains: ["INPUT", "FORWARD", "OUTPUT"].iter().map(|c| (c.to_string(), Vec::new())).collect(),
            sets: BTreeMap::new(),
        }
    }
}

impl MemoryState {
    fn chain(&mut self, name: &str) -> Option<&mut Vec<String>> {
        self.chains.iter_mut().find(|(n, _)| n == name).map(|(_, rules)| rules)
    }

    fn set_in_use(&self, set: &str) -> bool {
        self.chains.iter().flat_map(|(_, rules)| rules).any(|r| r.split_whitespace().any(|w| w == set))
    }
}

impl MemoryFirewall {
    pub fn new() -> MemoryFirewall {
        MemoryFirewall::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The filter table as `iptables-save -t filter` would print it.
    pub fn iptables_save(&self) -> String {
        let state = self.lock();
        let mut out = String::from("*filter\n");
        for (name, _) in &state.chains {
            let policy = if matches!(name.as_str(), "INPUT" | "FORWARD" | "OUTPUT") { "ACCEPT" } else { "-" };
            let _ = writeln!(out, ":{name} {policy} [0:0]");
        }
        for (name, rules) in &state.chains {
            for rule in rules {
                let _ = writeln!(out, "-A {name} {rule}");
            }
        }
        out.push_str("COMMIT\n");
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
        let mut guard = self.lock();
        let mut work = guard.clone();
        for (number, line) in input.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
            let fail = |why: &str| FirewallError::Command {
                command: "iptables-restore --noflush (memory)".into(),
                status: "exit status: 1".into(),
                stderr: format!("line {number}: {why}"),
                detail: format!("; the failing input line was: {line}"),
            };
            if line.is_empty() || line.starts_with('#') || line == "*filter" {
                continue;
            }
            if line == "COMMIT" {
                *guard = work.clone();
                continue;
            }
            if let Some(declaration) = line.strip_prefix(':') {
                let chain = declaration.split_whitespace().next().unwrap_or_default();
                match work.chain(chain) {
                    Some(rules) if !matches!(chain, "INPUT" | "FORWARD" | "OUTPUT") => rules.clear(),
                    Some(_) => {}
                    None => work.chains.push((chain.to_string(), Vec::new())),
                }
                continue;
            }
            let mut words = line.splitn(3, ' ');
            let (op, chain, rest) =
                (words.next().unwrap_or_default(), words.next().unwrap_or_default(), words.next().unwrap_or_default());
            let rule = normalize_rule(rest);
            let check_refs = |work: &MemoryState| -> Result<(), FirewallError> {
                let words: Vec<&str> = rule.split_whitespace().collect();
                for w in words.windows(2) {
                    if w[0] == "--match-set" && !work.sets.contains_key(w[1]) {
                        return Err(fail(&format!("set {} does not exist", w[1])));
                    }
                    if matches!(w[0], "-j" | "-g")
                        && w[1].starts_with(CHAIN_PREFIX)
                        && !work.chains.iter().any(|(n, _)| n == w[1])
                    {
                        return Err(fail(&format!("chain {} does not exist", w[1])));
                    }
                }
                Ok(())
            };
            match op {
                "-A" => {
                    check_refs(&work)?;
                    work.chain(chain).ok_or_else(|| fail("no such chain"))?.push(rule);
                }
                "-I" => {
                    let (position, rule) = match rest.split_once(' ').map(|(n, r)| (n.parse::<usize>(), r)) {
                        Some((Ok(n), r)) => (n, normalize_rule(r)),
                        _ => (1, rule.clone()),
                    };
                    check_refs(&work)?;
                    let rules = work.chain(chain).ok_or_else(|| fail("no such chain"))?;
                    if position == 0 || position > rules.len() + 1 {
                        return Err(fail("index of insertion too big"));
                    }
                    rules.insert(position - 1, rule);
                }
                "-D" => {
                    let rules = work.chain(chain).ok_or_else(|| fail("no such chain"))?;
                    let at = rules.iter().position(|r| *r == rule).ok_or_else(|| fail("no such rule"))?;
                    rules.remove(at);
                }
                "-F" => work.chain(chain).ok_or_else(|| fail("no such chain"))?.clear(),
                "-X" => {
                    let referenced = work.chains.iter().flat_map(|(_, r)| r).any(|r| {
                        r.split_whitespace()
                            .collect::<Vec<_>>()
                            .windows(2)
                            .any(|w| matches!(w[0], "-j" | "-g") && w[1] == chain)
                    });
                    match work.chain(chain) {
                        None => return Err(fail("no such chain")),
                        Some(rules) if !rules.is_empty() => return Err(fail("chain is not empty")),
                        Some(_) if referenced => return Err(fail("chain is referenced")),
                        Some(_) => work.chains.retain(|(n, _)| n != chain),
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
        Ruleset::from_saves(&self.iptables_save(), &self.ipset_save())
    }

    fn apply(&self, batch: &Batch) -> Result<(), FirewallError> {
        self.exec_ipset(&batch.ipset_prepare)?;
        self.exec_iptables(&batch.iptables)?;
        self.exec_ipset(&batch.ipset_cleanup)
    }
}

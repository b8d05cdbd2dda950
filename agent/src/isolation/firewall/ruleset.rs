//! The state we compare: [`Ruleset`] built from a spec ([`Ruleset::desired`]) or read back from
//! `iptables-save` and `ipset save` ([`Ruleset::from_saves`]), in one canonical spelling.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use hexa_shared::isolation::IsolationSpec;

use super::{CHAIN_PREFIX, FORWARD_CHAIN, FirewallError, INPUT_CHAIN, POD_CHAIN, SET_PREFIX, SYSTEM_SET};

/// Type and family of our sets, as `ipset save` prints them.
const SET_KIND: &str = "hash:ip family inet";

/// Our part of the kernel's firewall, normalised so that what we want and what `iptables-save` and
/// `ipset save` print compare equal when they mean the same.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ruleset {
    /// Our chains (`HEXA-*`) and their rules in order, each without the leading `-A <chain>`.
    pub chains: BTreeMap<String, Vec<String>>,
    /// Every rule outside our chains that jumps into one of them.
    pub jumps: BTreeSet<Jump>,
    /// Our sets (`hx-*`).
    pub sets: BTreeMap<String, IpSet>,
}

/// A rule in someone else's chain (`FORWARD`, `INPUT`) that jumps to one of ours.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Jump {
    pub chain: String,
    /// Index among all the rules of `chain`, 0 for the first.
    pub position: usize,
    pub rule: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IpSet {
    /// `hash:ip family inet` for ours.
    pub kind: String,
    pub members: BTreeSet<Ipv4Addr>,
    /// Entries that are not single IPv4 addresses (only someone else could have put them there).
    pub other_entries: Vec<String>,
}

/// The ipset name of a tenant: `hx-t-<first 10 characters of the name>-<40-bit FNV-1a hash>`, at most
/// 26 characters so that `<name>-new` still fits ipset's 31. Stable across agent versions and nodes;
/// the prefix is there for a person reading `ipset list`.
pub fn tenant_set_name(tenant: &str) -> String {
    let prefix: String = tenant.chars().take(10).collect();
    let prefix = prefix.trim_end_matches('-');
    format!("hx-t-{prefix}-{:010x}", fnv1a64(tenant.as_bytes()) & 0xff_ffff_ffff)
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

impl Ruleset {
    /// What the spec asks for. Validates the spec first.
    pub fn desired(spec: &IsolationSpec) -> Result<Ruleset, FirewallError> {
        spec.validate()?;
        let pods = spec.pod_cidr.to_string();
        let mut sets = BTreeMap::new();
        sets.insert(SYSTEM_SET.to_string(), IpSet::ours(spec.system_pod_ips.iter().copied()));
        let mut tenants: Vec<(&str, String)> =
            spec.tenants.iter().map(|t| (t.tenant.as_str(), tenant_set_name(&t.tenant))).collect();
        tenants.sort();
        let mut owners: BTreeMap<String, &str> = BTreeMap::new();
        for tenant in &spec.tenants {
            let set = tenant_set_name(&tenant.tenant);
            if let Some(first) = owners.insert(set.clone(), &tenant.tenant) {
                return Err(FirewallError::SetNameCollision {
                    set,
                    first: first.to_string(),
                    second: tenant.tenant.clone(),
                });
            }
            sets.insert(set, IpSet::ours(tenant.pod_ips.iter().copied()));
        }

        let established = "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN".to_string();
        let to_management: Vec<String> =
            spec.management_cidrs.iter().map(|m| format!("-s {pods} -d {m} -j DROP")).collect();
        let mut forward = vec![established.clone()];
        forward.extend(to_management.iter().cloned());
        forward.push(format!("-s {pods} -d {pods} -j {POD_CHAIN}"));
        let mut input = vec![established];
        input.extend(to_management);
        let mut pod = vec![
            format!("-m set --match-set {SYSTEM_SET} src -j RETURN"),
            format!("-m set --match-set {SYSTEM_SET} dst -j RETURN"),
        ];
        for (tenant, set) in &tenants {
            pod.push(format!(
                "-m set --match-set {set} src -m set --match-set {set} dst -m comment --comment \"tenant {tenant}\" \
                 -j RETURN"
            ));
        }
        pod.push("-m comment --comment \"pods of different tenants\" -j DROP".to_string());

        let normalise = |rules: Vec<String>| rules.iter().map(|r| normalize_rule(r)).collect::<Vec<_>>();
        let chains = BTreeMap::from([
            (FORWARD_CHAIN.to_string(), normalise(forward)),
            (INPUT_CHAIN.to_string(), normalise(input)),
            (POD_CHAIN.to_string(), normalise(pod)),
        ]);
        let jumps = BTreeSet::from([
            Jump { chain: "FORWARD".into(), position: 0, rule: format!("-j {FORWARD_CHAIN}") },
            Jump { chain: "INPUT".into(), position: 0, rule: format!("-j {INPUT_CHAIN}") },
        ]);
        Ok(Ruleset { chains, jumps, sets })
    }

    /// Reads our part out of `iptables-save -t filter` and `ipset save` output (whole or already
    /// filtered: everything that is not ours is skipped, but rules before our jumps are counted).
    pub fn from_saves(iptables_save: &str, ipset_save: &str) -> Result<Ruleset, FirewallError> {
        let mut ruleset = Ruleset::default();
        let mut table = String::new();
        let mut positions: BTreeMap<String, usize> = BTreeMap::new();
        for line in iptables_save.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('*') {
                table = name.to_string();
                positions.clear();
            } else if table != "filter" || line.is_empty() || line.starts_with('#') || line == "COMMIT" {
                continue;
            } else if let Some(declaration) = line.strip_prefix(':') {
                let chain = declaration.split_whitespace().next().unwrap_or_default();
                if chain.starts_with(CHAIN_PREFIX) {
                    ruleset.chains.entry(chain.to_string()).or_default();
                }
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let (chain, rule) = rest.split_once(' ').unwrap_or((rest, ""));
                let position = positions.entry(chain.to_string()).or_default();
                let rule = normalize_rule(rule);
                if chain.starts_with(CHAIN_PREFIX) {
                    ruleset.chains.entry(chain.to_string()).or_default().push(rule);
                } else if targets_our_chain(&rule) {
                    ruleset.jumps.insert(Jump { chain: chain.to_string(), position: *position, rule });
                }
                *position += 1;
            } else {
                return Err(FirewallError::Parse {
                    what: "iptables-save",
                    line: line.to_string(),
                    why: "expected *table, :chain, -A chain rule or COMMIT".into(),
                });
            }
        }
        for line in ipset_save.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let mut words = line.split_whitespace();
            let (command, name) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
            if !name.starts_with(SET_PREFIX) {
                continue;
            }
            match command {
                "create" => {
                    let kind = words.next().unwrap_or_default();
                    let rest: Vec<&str> = words.collect();
                    let family = rest.windows(2).find(|w| w[0] == "family").map(|w| w[1]).unwrap_or("inet");
                    ruleset.sets.insert(
                        name.to_string(),
                        IpSet { kind: format!("{kind} family {family}"), ..IpSet::default() },
                    );
                }
                "add" => {
                    let set = ruleset.sets.get_mut(name).ok_or_else(|| FirewallError::Parse {
                        what: "ipset save",
                        line: line.to_string(),
                        why: "member of a set that was not created before".into(),
                    })?;
                    let entry: Vec<&str> = words.collect();
                    match (entry.as_slice(), entry.first().and_then(|e| e.parse::<Ipv4Addr>().ok())) {
                        ([_], Some(ip)) => {
                            set.members.insert(ip);
                        }
                        _ => set.other_entries.push(entry.join(" ")),
                    }
                }
                _ => {
                    return Err(FirewallError::Parse {
                        what: "ipset save",
                        line: line.to_string(),
                        why: "expected create or add".into(),
                    });
                }
            }
        }
        Ok(ruleset)
    }

    /// Number of iptables rules, jumps included.
    pub fn rule_count(&self) -> usize {
        self.chains.values().map(Vec::len).sum::<usize>() + self.jumps.len()
    }

    /// Number of set members over all sets.
    pub fn member_count(&self) -> usize {
        self.sets.values().map(|s| s.members.len()).sum()
    }
}

impl IpSet {
    fn ours(members: impl IntoIterator<Item = Ipv4Addr>) -> IpSet {
        IpSet { kind: SET_KIND.to_string(), members: members.into_iter().collect(), other_entries: Vec::new() }
    }
}

fn targets_our_chain(rule: &str) -> bool {
    let words: Vec<&str> = rule.split_whitespace().collect();
    words.windows(2).any(|w| matches!(w[0], "-j" | "-g") && w[1].starts_with(CHAIN_PREFIX))
}

/// The canonical spelling of one rule (without `-A <chain>`), as `iptables-save` prints it: long
/// options shortened, single addresses with `/32`, protocol numbers as names, conntrack states
/// in iptables' order, values with spaces in double quotes. Applied to both sides of every comparison.
pub fn normalize_rule(rule: &str) -> String {
    let tokens = tokenize(rule);
    let mut out: Vec<String> = Vec::with_capacity(tokens.len());
    let mut iter = tokens.into_iter();
    while let Some(token) = iter.next() {
        let option = match token.as_str() {
            "--source" | "--src" => "-s",
            "--destination" | "--dst" => "-d",
            "--protocol" => "-p",
            "--jump" => "-j",
            "--goto" => "-g",
            "--match" => "-m",
            "--in-interface" => "-i",
            "--out-interface" => "-o",
            other => other,
        }
        .to_string();
        let value = match option.as_str() {
            "-s" | "-d" | "-p" | "--ctstate" | "--state" => iter.next(),
            _ => None,
        };
        let value = value.map(|v| match option.as_str() {
            "-s" | "-d" if !v.contains('/') => format!("{v}/32"),
            "-p" => match v.as_str() {
                "1" => "icmp".to_string(),
                "6" => "tcp".to_string(),
                "17" => "udp".to_string(),
                other => other.to_ascii_lowercase(),
            },
            "--ctstate" | "--state" => {
                // In the order iptables prints them.
                const ORDER: [&str; 7] = ["INVALID", "NEW", "RELATED", "ESTABLISHED", "UNTRACKED", "SNAT", "DNAT"];
                let mut states: Vec<String> = v.split(',').map(str::to_ascii_uppercase).collect();
                states.sort_by_key(|s| (ORDER.iter().position(|o| o == s).unwrap_or(ORDER.len()), s.clone()));
                states.join(",")
            }
            _ => v,
        });
        out.push(option);
        out.extend(value);
    }
    out.iter().map(|t| quote(t)).collect::<Vec<_>>().join(" ")
}

/// Splits like iptables-restore does: on spaces, with double quotes grouping and `\"` escaping.
pub(super) fn tokenize(rule: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut current = String::new();
    let mut in_token = false;
    let mut quoted = false;
    let mut chars = rule.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                current.extend(chars.next());
            }
            '"' => {
                quoted = !quoted;
                in_token = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_token {
                    tokens.push(std::mem::take(&mut current));
                    in_token = false;
                }
            }
            c => {
                current.push(c);
                in_token = true;
            }
        }
    }
    if in_token {
        tokens.push(current);
    }
    tokens
}

fn quote(token: &str) -> String {
    if token.is_empty() || token.contains(|c: char| c.is_whitespace() || c == '"' || c == '\\') {
        format!("\"{}\"", token.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        token.to_string()
    }
}

//! The state we compare: [`Ruleset`] built from a spec and the node's own pods
//! ([`Ruleset::desired`]) or read back from `iptables-save`, `ip6tables-save` and `ipset save`
//! ([`Ruleset::from_saves`]), in one canonical spelling.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use hexa_shared::isolation::{Ipv4Cidr, IsolationSpec};

use super::{
    CHAIN_PREFIX, FORWARD_CHAIN, FirewallError, INPUT_CHAIN, NODE_CHAIN, NODES_SET, POD_CHAIN, SET_PREFIX, SPOOF_CHAIN,
    SYSTEM_SET,
};

/// Type and family of our address sets, as `ipset save` prints them.
const IP_SET_KIND: &str = "hash:ip family inet";

/// IPv4 (`iptables`) or IPv6 (`ip6tables`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

/// The tables we read. Our rules live in `mangle`, whose `FORWARD` and `INPUT` run before
/// `filter`'s: a DROP there is final whatever another program puts first in `filter` (kube-router's
/// network-policy ACCEPTs). `filter` is read only to remove what older agents put there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Mangle,
    Filter,
}

impl Table {
    pub fn name(self) -> &'static str {
        match self {
            Table::Mangle => "mangle",
            Table::Filter => "filter",
        }
    }

    pub(super) fn parse(name: &str) -> Option<Table> {
        match name {
            "mangle" => Some(Table::Mangle),
            "filter" => Some(Table::Filter),
            _ => None,
        }
    }
}

/// A chain in one family's table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChainRef {
    pub family: Family,
    pub table: Table,
    pub name: String,
}

impl ChainRef {
    pub fn new(family: Family, table: Table, name: &str) -> ChainRef {
        ChainRef { family, table, name: name.to_string() }
    }

    /// An IPv4 chain of the mangle table, where all of ours are.
    pub fn v4(name: &str) -> ChainRef {
        ChainRef::new(Family::V4, Table::Mangle, name)
    }

    pub fn v6(name: &str) -> ChainRef {
        ChainRef::new(Family::V6, Table::Mangle, name)
    }
}

impl fmt::Display for ChainRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let family = match self.family {
            Family::V4 => "",
            Family::V6 => "ip6 ",
        };
        write!(f, "{family}{} {}", self.table.name(), self.name)
    }
}

/// Our part of the kernel's firewall, normalised so that what we want and what `iptables-save`,
/// `ip6tables-save` and `ipset save` print compare equal when they mean the same.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ruleset {
    /// Our chains (`HEXA-*`) and their rules in order, each without the leading `-A <chain>`.
    pub chains: BTreeMap<ChainRef, Vec<String>>,
    /// Every rule outside our chains that jumps into one of them.
    pub jumps: BTreeSet<Jump>,
    /// Our sets (`hx-*`).
    pub sets: BTreeMap<String, IpSet>,
}

/// A rule in someone else's chain (`FORWARD`, `INPUT`) that jumps to one of ours.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Jump {
    pub chain: ChainRef,
    /// Index among all the rules of `chain`, 0 for the first.
    pub position: usize,
    pub rule: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IpSet {
    /// `hash:ip family inet` for ours.
    pub kind: String,
    pub members: BTreeSet<Ipv4Addr>,
    /// Entries that are neither (only someone else could have put them there).
    pub other_entries: Vec<String>,
}

/// What only the node knows: the bridge its pods hang on, and which port each of its pods sends
/// from. The coordinator cannot say this (and no other node may): it is read on the node from the
/// container runtime's network records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPods {
    /// The pods' bridge (`cni0` under K3s' flannel).
    pub bridge: String,
    /// Each local pod's address and its bridge port.
    pub ports: BTreeSet<(Ipv4Addr, String)>,
    /// This node's own pod subnet, when known: an address in it arriving from anywhere but the
    /// bridge is forged.
    pub pod_subnet: Option<Ipv4Cidr>,
}

/// K3s' flannel bridge.
pub const DEFAULT_BRIDGE: &str = "cni0";

impl Default for LocalPods {
    fn default() -> Self {
        LocalPods { bridge: DEFAULT_BRIDGE.to_string(), ports: BTreeSet::new(), pod_subnet: None }
    }
}

/// The ipset name of a tenant: `hx-t-<first 10 characters of the name>-<40-bit FNV-1a hash>`, at most
/// 26 characters so that `<name>-new` still fits ipset's 31. Stable across agent versions and nodes;
/// the prefix is there for a person reading `ipset list`.
pub fn tenant_set_name(tenant: &str) -> String {
    let prefix: String = tenant.chars().take(10).collect();
    let prefix = prefix.trim_end_matches('-');
    format!("hx-t-{prefix}-{:010x}", fnv1a64(tenant.as_bytes()) & 0xff_ffff_ffff)
}

/// The ipset of the node addresses that serve a node service: `hx-s-<name>` (names are at most 12).
pub fn service_set_name(service: &str) -> String {
    format!("hx-s-{service}")
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

impl Ruleset {
    /// What the spec asks for on a node whose own pods are `local`. Validates the spec first.
    pub fn desired(spec: &IsolationSpec, local: &LocalPods) -> Result<Ruleset, FirewallError> {
        spec.validate()?;
        if !valid_interface(&local.bridge) {
            return Err(FirewallError::BadInterface(local.bridge.clone()));
        }
        if let Some((_, port)) = local.ports.iter().find(|(_, port)| !valid_interface(port)) {
            return Err(FirewallError::BadInterface(port.clone()));
        }
        let pods = spec.pod_cidr.to_string();
        let bridge = &local.bridge;
        let mut sets = BTreeMap::new();
        sets.insert(SYSTEM_SET.to_string(), IpSet::of_ips(spec.system_pod_ips.iter().copied()));
        sets.insert(NODES_SET.to_string(), IpSet::of_ips(spec.node_addresses.iter().copied()));
        for service in &spec.node_services {
            sets.insert(service_set_name(&service.name), IpSet::of_ips(service.addresses.iter().copied()));
        }
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
            sets.insert(set, IpSet::of_ips(tenant.pod_ips.iter().copied()));
        }

        // Forged sources first: nothing after them (not even "established") may be fooled. The
        // bridge port is matched per local pod: an ipset of (address, port) pairs would be one rule,
        // but ipset sees no bridge port on packets the node routes rather than bridges.
        let mut forged = vec![format!("-i {bridge} -j {SPOOF_CHAIN}")];
        let mut spoof: Vec<String> =
            local.ports.iter().map(|(ip, port)| format!("-s {ip} -m physdev --physdev-in {port} -j RETURN")).collect();
        spoof.push("-m comment --comment \"spoofed pod source\" -j DROP".to_string());
        if let Some(subnet) = local.pod_subnet {
            forged
                .push(format!("-s {subnet} ! -i {bridge} -m comment --comment \"spoofed local pod address\" -j DROP"));
        }
        let established = "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN".to_string();
        let to_management: Vec<String> =
            spec.management_cidrs.iter().map(|m| format!("-s {pods} -d {m} -j DROP")).collect();
        let mut forward = forged.clone();
        forward.push(established.clone());
        forward.extend(to_management.iter().cloned());
        forward.push(format!("-s {pods} -m set --match-set {NODES_SET} dst -j {NODE_CHAIN}"));
        forward.push(format!("-s {pods} -d {pods} -j {POD_CHAIN}"));
        let mut input = forged;
        input.push(established);
        input.extend(to_management);
        // Every address of this node, its bridge gateway included.
        input.push(format!("-s {pods} -j {NODE_CHAIN}"));
        let mut node = Vec::new();
        for service in &spec.node_services {
            let protocol = service.protocol;
            let system =
                if service.system_only { format!("-m set --match-set {SYSTEM_SET} src ") } else { String::new() };
            node.push(format!(
                "-p {protocol} {system}-m set --match-set {} dst -m {protocol} --dport {} -m comment --comment \"service {}\" \
                 -j RETURN",
                service_set_name(&service.name),
                service.port,
                service.name
            ));
        }
        node.push("-m comment --comment \"pods to node addresses\" -j DROP".to_string());
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
        // The cluster's pod network is IPv4: no pod sends IPv6 anywhere.
        let no_ipv6 = vec![format!("-i {bridge} -m comment --comment \"pods have no IPv6\" -j DROP")];

        let normalise = |rules: Vec<String>| rules.iter().map(|r| normalize_rule(r)).collect::<Vec<_>>();
        let chains = BTreeMap::from([
            (ChainRef::v4(FORWARD_CHAIN), normalise(forward)),
            (ChainRef::v4(INPUT_CHAIN), normalise(input)),
            (ChainRef::v4(NODE_CHAIN), normalise(node)),
            (ChainRef::v4(POD_CHAIN), normalise(pod)),
            (ChainRef::v4(SPOOF_CHAIN), normalise(spoof)),
            (ChainRef::v6(FORWARD_CHAIN), normalise(no_ipv6.clone())),
            (ChainRef::v6(INPUT_CHAIN), normalise(no_ipv6)),
        ]);
        let jump = |chain: ChainRef, target: &str| Jump { chain, position: 0, rule: format!("-j {target}") };
        let jumps = BTreeSet::from([
            jump(ChainRef::v4("FORWARD"), FORWARD_CHAIN),
            jump(ChainRef::v4("INPUT"), INPUT_CHAIN),
            jump(ChainRef::v6("FORWARD"), FORWARD_CHAIN),
            jump(ChainRef::v6("INPUT"), INPUT_CHAIN),
        ]);
        Ok(Ruleset { chains, jumps, sets })
    }

    /// Reads our part out of `iptables-save` and `ip6tables-save` output (of the mangle and filter
    /// tables, whole or already filtered: everything that is not ours is skipped, but rules before
    /// our jumps are counted) and `ipset save` output.
    pub fn from_saves(iptables_save: &str, ip6tables_save: &str, ipset_save: &str) -> Result<Ruleset, FirewallError> {
        let mut ruleset = Ruleset::default();
        ruleset.read_tables(Family::V4, iptables_save)?;
        ruleset.read_tables(Family::V6, ip6tables_save)?;
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
                        ([_], Some(member)) => {
                            set.members.insert(member);
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

    fn read_tables(&mut self, family: Family, save: &str) -> Result<(), FirewallError> {
        let what = match family {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        };
        let mut table = None;
        let mut positions: BTreeMap<String, usize> = BTreeMap::new();
        for line in save.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('*') {
                table = Table::parse(name);
                positions.clear();
                continue;
            }
            let Some(table) = table else { continue };
            if line.is_empty() || line.starts_with('#') || line == "COMMIT" {
                continue;
            } else if let Some(declaration) = line.strip_prefix(':') {
                let chain = declaration.split_whitespace().next().unwrap_or_default();
                if chain.starts_with(CHAIN_PREFIX) {
                    self.chains.entry(ChainRef::new(family, table, chain)).or_default();
                }
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let (chain, rule) = rest.split_once(' ').unwrap_or((rest, ""));
                let position = positions.entry(chain.to_string()).or_default();
                let rule = normalize_rule(rule);
                let chain = ChainRef::new(family, table, chain);
                if chain.name.starts_with(CHAIN_PREFIX) {
                    self.chains.entry(chain).or_default().push(rule);
                } else if targets_our_chain(&rule) {
                    self.jumps.insert(Jump { chain, position: *position, rule });
                }
                *position += 1;
            } else {
                return Err(FirewallError::Parse {
                    what,
                    line: line.to_string(),
                    why: "expected *table, :chain, -A chain rule or COMMIT".into(),
                });
            }
        }
        Ok(())
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
    fn of_ips(members: impl IntoIterator<Item = Ipv4Addr>) -> IpSet {
        IpSet { kind: IP_SET_KIND.to_string(), members: members.into_iter().collect(), other_entries: Vec::new() }
    }
}

/// A Linux interface name: 1 to 15 characters, none of them space, `/`, `,` or a quote.
fn valid_interface(name: &str) -> bool {
    !name.is_empty() && name.len() <= 15 && name.bytes().all(|b| b.is_ascii_graphic() && !b"/,\"'\\".contains(&b))
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

//! The tenant firewall: iptables chains `HEXA-*` and ipsets `hx-*` in the node's network namespace.
//!
//! # What it enforces
//! On every node, for the tenants the node hosts:
//! - traffic with both ends in the pod CIDR is dropped unless both ends are pods of the same tenant or
//!   one end is a system pod (DNS, ingress). Same-node traffic over the CNI bridge is seen too, because
//!   Kubernetes nodes run with `net.bridge.bridge-nf-call-iptables=1`;
//! - no pod (system pods included) opens a connection to a management CIDR, whether the management
//!   host is elsewhere (`FORWARD`) or is one of this node's own addresses (`INPUT`): "never" holds for
//!   the node's addresses too. Management hosts may still open connections to pods; the replies pass;
//! - the node itself is never restricted: there is no jump from `OUTPUT`, and rules only ever match
//!   packets whose source is in the pod CIDR. Host-network pods are the node, and are not restricted.
//!
//! # How
//! One ipset `hx-t-<id>` (`hash:ip`) per tenant hosted here, holding that tenant's pod IPs
//! cluster-wide, and `hx-sys` for the system pods; so the rule count grows with the tenants on the
//! node, never with pods. Chains:
//!
//! ```text
//! FORWARD  -> HEXA-FWD  (first rule)     INPUT -> HEXA-IN (first rule)
//! HEXA-FWD: RELATED,ESTABLISHED RETURN   HEXA-IN: RELATED,ESTABLISHED RETURN
//!           pods -> each management DROP          pods -> each management DROP
//!           pods -> pods  HEXA-POD
//! HEXA-POD: src in hx-sys RETURN; dst in hx-sys RETURN
//!           src and dst in hx-t-<id> RETURN (one rule per tenant)
//!           DROP
//! ```
//!
//! Our chains only ever `DROP` or `RETURN`, never `ACCEPT`: whatever we let through still meets the
//! rules after us in `FORWARD`/`INPUT` (K3s network policies, flannel, kube-proxy), so a tenant's own
//! `NetworkPolicy` keeps working. Our jumps are kept first so that nobody's `ACCEPT` comes before us;
//! a controller that also insists on being first (kube-router) will be moved down at each reconcile.
//!
//! # Applying
//! [`Ruleset::desired`] turns the spec into the state we want; [`Ruleset::from_saves`] reads what
//! the kernel has (`iptables-save`, `ipset save`, keeping only what is ours); [`plan`] compares the
//! two and, when they differ, renders one [`Batch`], applied in three steps:
//! 1. `ipset restore`: sets that are new are created and filled; sets whose members changed are
//!    rebuilt as `<set>-new`, then `swap`ped in (atomic per set) and the old content destroyed;
//! 2. `iptables-restore --noflush`: one transaction (one `COMMIT`) that rewrites only the chains that
//!    differ (declaring a chain flushes it), fixes our jumps and deletes stale `HEXA-*` chains; it
//!    never flushes a table or touches anyone else's chain;
//! 3. `ipset restore`: sets nothing refers to any more (a removed tenant's) are destroyed, only now
//!    that the rules that used them are gone.
//!
//! A reconcile that finds no drift writes nothing. At no point in a batch are the rules looser than
//! both the old and the new state: new sets exist before rules name them, old sets go after.
//!
//! Not covered: IPv6 (a dual-stack cluster needs the same with `ip6tables`); NodePort and LoadBalancer
//! traffic that another node has masqueraded arrives with a node address and counts as external.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
#[cfg(any(test, feature = "testing"))]
use std::sync::Mutex;
#[cfg(any(test, feature = "testing"))]
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hexa_shared::isolation::{IsolationError, IsolationSpec, MAX_IPS_PER_SET};
use tracing::{debug, info};

#[cfg(any(test, feature = "testing"))]
pub mod bench;

/// Jumped to first from `FORWARD`: traffic the node routes or bridges.
pub const FORWARD_CHAIN: &str = "HEXA-FWD";
/// Jumped to first from `INPUT`: traffic to the node's own addresses.
pub const INPUT_CHAIN: &str = "HEXA-IN";
/// Pod-to-pod traffic: who may talk to whom.
pub const POD_CHAIN: &str = "HEXA-POD";
/// Every chain whose name starts with this is ours.
pub const CHAIN_PREFIX: &str = "HEXA-";
/// Every ipset whose name starts with this is ours.
pub const SET_PREFIX: &str = "hx-";
/// The system pods' set.
pub const SYSTEM_SET: &str = "hx-sys";
/// ipset names are at most 31 characters.
pub const MAX_SET_NAME: usize = 31;
/// Suffix of the set a changed set is rebuilt in before the swap.
const NEW_SUFFIX: &str = "-new";
/// Type and family of our sets, as `ipset save` prints them.
const SET_KIND: &str = "hash:ip family inet";

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("isolation spec: {0}")]
    Spec(#[from] IsolationError),
    #[error("tenants {first:?} and {second:?} both map to ipset {set}: rename one of them")]
    SetNameCollision { set: String, first: String, second: String },
    #[error("cannot run `{command}`: {source} (install it: apt-get install -y iptables ipset iproute2)")]
    Spawn { command: String, source: std::io::Error },
    #[error("`{command}` failed ({status}): {stderr}{detail}")]
    Command { command: String, status: String, stderr: String, detail: String },
    #[error("cannot read `{what}` output, line {line:?}: {why}")]
    Parse { what: &'static str, line: String, why: String },
    #[error(
        "the firewall still differs after applying a batch ({0}): another program rewrites our chains or sets, \
         or it uses the other iptables backend (check `iptables --version`: nf_tables or legacy)"
    )]
    NotConverged(Drift),
    #[error("network namespace: {0}")]
    Netns(String),
}

// ---------------------------------------------------------------------------------------------------
// Desired and current state
// ---------------------------------------------------------------------------------------------------

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
fn tokenize(rule: &str) -> Vec<String> {
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

// ---------------------------------------------------------------------------------------------------
// Comparing and rendering
// ---------------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------------
// The seam
// ---------------------------------------------------------------------------------------------------

/// Where the rules live: the kernel (through the iptables and ipset tools) or a fake.
pub trait Firewall {
    /// Our chains, the jumps into them and our sets as they are now.
    fn current(&self) -> Result<Ruleset, FirewallError>;
    /// Runs the batch's steps in order, stopping at the first that fails.
    fn apply(&self, batch: &Batch) -> Result<(), FirewallError>;
}

/// What a reconcile did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconciled {
    /// Nothing differed; nothing was written.
    Unchanged,
    /// One batch was applied to correct this drift, and reading back found no drift left.
    Applied { drift: Drift },
}

/// Brings the firewall to `desired`: reads the current state, writes nothing when it matches, and
/// otherwise applies one batch and reads back to check that it took.
pub fn reconcile<F: Firewall + ?Sized>(firewall: &F, desired: &Ruleset) -> Result<Reconciled, FirewallError> {
    let current = firewall.current()?;
    let Some(batch) = plan(desired, &current) else {
        debug!(rules = desired.rule_count(), sets = desired.sets.len(), "firewall has no drift");
        return Ok(Reconciled::Unchanged);
    };
    let found = drift(desired, &current);
    firewall.apply(&batch)?;
    let left = drift(desired, &firewall.current()?);
    if !left.is_empty() {
        return Err(FirewallError::NotConverged(left));
    }
    info!(drift = %found, rules = desired.rule_count(), sets = desired.sets.len(), "firewall reconciled");
    Ok(Reconciled::Applied { drift: found })
}

/// [`reconcile`] to the state of `spec`.
pub fn reconcile_spec<F: Firewall + ?Sized>(firewall: &F, spec: &IsolationSpec) -> Result<Reconciled, FirewallError> {
    reconcile(firewall, &Ruleset::desired(spec)?)
}

/// Removes every chain, jump and set of ours (the agent being uninstalled).
pub fn teardown<F: Firewall + ?Sized>(firewall: &F) -> Result<Reconciled, FirewallError> {
    reconcile(firewall, &Ruleset::default())
}

/// The real thing: `iptables-save`/`iptables-restore --noflush` and `ipset save`/`ipset restore`,
/// optionally behind a command prefix such as `ip netns exec <ns>`.
#[derive(Debug, Clone)]
pub struct SystemFirewall {
    prefix: Vec<String>,
    iptables: String,
    ipset: String,
}

impl Default for SystemFirewall {
    fn default() -> Self {
        SystemFirewall { prefix: Vec::new(), iptables: "iptables".into(), ipset: "ipset".into() }
    }
}

/// How long each step of an apply took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepTimes {
    pub ipset_prepare: Duration,
    pub iptables: Duration,
    pub ipset_cleanup: Duration,
}

impl SystemFirewall {
    /// The node's own namespace, with the default `iptables` (nf_tables on Debian 12).
    pub fn new() -> SystemFirewall {
        SystemFirewall::default()
    }

    /// Runs every command through `ip netns exec <name>`.
    pub fn in_netns(name: &str) -> SystemFirewall {
        SystemFirewall::with_prefix(["ip", "netns", "exec", name].map(String::from).to_vec())
    }

    /// Runs every command as `<prefix...> <command>`.
    pub fn with_prefix(prefix: Vec<String>) -> SystemFirewall {
        SystemFirewall { prefix, ..SystemFirewall::default() }
    }

    /// Uses `<base>`, `<base>-save` and `<base>-restore` (e.g. `iptables-legacy`) instead of
    /// `iptables`: the agent must use the backend K3s uses, or both rule sets apply side by side.
    pub fn with_iptables(mut self, base: &str) -> SystemFirewall {
        self.iptables = base.to_string();
        self
    }

    /// The `iptables` binary this firewall runs (for one-rule-at-a-time baselines).
    pub fn iptables_binary(&self) -> &str {
        &self.iptables
    }

    /// Applies the batch like [`Firewall::apply`] and says how long each step took.
    pub fn apply_timed(&self, batch: &Batch) -> Result<StepTimes, FirewallError> {
        let mut times = StepTimes::default();
        let ipset = self.ipset.clone();
        let iptables_restore = format!("{}-restore", self.iptables);
        let steps: [(&str, &[&str], &str, &mut Duration); 3] = [
            (&ipset, &["restore"], &batch.ipset_prepare, &mut times.ipset_prepare),
            (&iptables_restore, &["-w", "5", "--noflush"], &batch.iptables, &mut times.iptables),
            (&ipset, &["restore"], &batch.ipset_cleanup, &mut times.ipset_cleanup),
        ];
        for (program, args, input, time) in steps {
            if input.is_empty() {
                continue;
            }
            let started = Instant::now();
            self.run(program, args, Some(input))?;
            *time = started.elapsed();
        }
        Ok(times)
    }

    /// Runs one command (through the prefix) and returns its standard output.
    pub fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
        let mut argv: Vec<&str> = self.prefix.iter().map(String::as_str).collect();
        argv.push(program);
        argv.extend_from_slice(args);
        let command = argv.join(" ");
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..])
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| FirewallError::Spawn { command: command.clone(), source })?;
        let output = std::thread::scope(|scope| {
            if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
                // A writer thread, so that a child filling its stderr cannot deadlock against us.
                // A write error means the child exited early; its status tells why.
                scope.spawn(move || pipe.write_all(input.as_bytes()));
            }
            child.wait_with_output()
        })
        .map_err(|source| FirewallError::Spawn { command: command.clone(), source })?;
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        let detail = failed_line(&stderr, stdin.unwrap_or_default())
            .map(|line| format!("; the failing input line was: {line}"))
            .unwrap_or_default();
        Err(FirewallError::Command { command, status: output.status.to_string(), stderr, detail })
    }
}

/// Both tools name the input line they choke on as "line N".
fn failed_line(stderr: &str, input: &str) -> Option<String> {
    let at = stderr.find("line ")?;
    let digits: String = stderr[at + 5..].chars().take_while(char::is_ascii_digit).collect();
    let n: usize = digits.parse().ok()?;
    input.lines().nth(n.checked_sub(1)?).map(str::to_string)
}

impl Firewall for SystemFirewall {
    fn current(&self) -> Result<Ruleset, FirewallError> {
        let iptables = self.run(&format!("{}-save", self.iptables), &["-t", "filter"], None)?;
        let ipset = self.run(&self.ipset, &["save"], None)?;
        Ruleset::from_saves(&iptables, &ipset)
    }

    fn apply(&self, batch: &Batch) -> Result<(), FirewallError> {
        self.apply_timed(batch).map(|_| ())
    }
}

/// Wraps a firewall and records every batch applied through it, so that a test can prove that a
/// reconcile wrote nothing.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug)]
pub struct Recording<F> {
    inner: F,
    writes: Mutex<Vec<Batch>>,
    reads: AtomicUsize,
}

#[cfg(any(test, feature = "testing"))]
impl<F: Firewall> Recording<F> {
    pub fn new(inner: F) -> Recording<F> {
        Recording { inner, writes: Mutex::new(Vec::new()), reads: AtomicUsize::new(0) }
    }

    /// Every batch passed to `apply`, including those that failed.
    pub fn writes(&self) -> Vec<Batch> {
        self.writes.lock().map(|w| w.clone()).unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// How many times the state was read.
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }

    pub fn inner(&self) -> &F {
        &self.inner
    }
}

#[cfg(any(test, feature = "testing"))]
impl<F: Firewall> Firewall for Recording<F> {
    fn current(&self) -> Result<Ruleset, FirewallError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.current()
    }

    fn apply(&self, batch: &Batch) -> Result<(), FirewallError> {
        match self.writes.lock() {
            Ok(mut writes) => writes.push(batch.clone()),
            Err(poisoned) => poisoned.into_inner().push(batch.clone()),
        }
        self.inner.apply(batch)
    }
}

// ---------------------------------------------------------------------------------------------------
// The fake
// ---------------------------------------------------------------------------------------------------

/// An in-memory filter table and ipset store that interprets the batch language we emit with the
/// kernel's rules: an iptables transaction is all or nothing; `ipset restore` stops at the first
/// failing line; a set referenced by a rule cannot be destroyed; a chain that is referenced or not
/// empty cannot be deleted. `current` goes through the same parser as the real thing.
#[derive(Debug, Default)]
#[cfg(any(test, feature = "testing"))]
pub struct MemoryFirewall {
    state: Mutex<MemoryState>,
}

#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Clone)]
struct MemoryState {
    /// Every chain of the filter table, built-in ones first, with its rules.
    chains: Vec<(String, Vec<String>)>,
    sets: BTreeMap<String, (String, Vec<String>)>,
}

#[cfg(any(test, feature = "testing"))]
impl Default for MemoryState {
    fn default() -> Self {
        MemoryState {
            chains: ["INPUT", "FORWARD", "OUTPUT"].iter().map(|c| (c.to_string(), Vec::new())).collect(),
            sets: BTreeMap::new(),
        }
    }
}

#[cfg(any(test, feature = "testing"))]
impl MemoryState {
    fn chain(&mut self, name: &str) -> Option<&mut Vec<String>> {
        self.chains.iter_mut().find(|(n, _)| n == name).map(|(_, rules)| rules)
    }

    fn set_in_use(&self, set: &str) -> bool {
        self.chains.iter().flat_map(|(_, rules)| rules).any(|r| r.split_whitespace().any(|w| w == set))
    }
}

#[cfg(any(test, feature = "testing"))]
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

#[cfg(any(test, feature = "testing"))]
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

#[cfg(test)]
mod tests;

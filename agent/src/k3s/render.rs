//! Pure rendering: from a [`K3sSpec`] to the exact bytes of K3s' config file, its systemd unit and
//! the unit's environment file, in the shape K3s' own installer (`install.sh`) writes them.
//!
//! Everything K3s is told goes into `/etc/rancher/k3s/config.yaml` (mode 0600: it holds the join
//! token), so the unit's command line is only `k3s server` or `k3s agent` and a changed setting
//! changes exactly one file.

use std::path::{Path, PathBuf};

use hexa_shared::k3s::{K3sRole, K3sSpec, RoleKind};
use hexa_shared::spec::Taint;

use super::paths;

/// Mode of files that hold the join token or the service's environment.
pub const SECRET_MODE: u32 = 0o600;
/// Mode of the systemd unit.
pub const UNIT_MODE: u32 = 0o644;
/// Mode of the k3s binary.
pub const BINARY_MODE: u32 = 0o755;

/// The systemd unit K3s runs as: `k3s.service` for a server, `k3s-agent.service` for an agent, as
/// K3s' installer names them.
pub fn unit_name(role: RoleKind) -> &'static str {
    match role {
        RoleKind::Server => "k3s.service",
        RoleKind::Agent => "k3s-agent.service",
    }
}

/// The agent's own unit. K3s' units order after it and require it: the agent tells systemd it is
/// ready only once the node's isolation is in force, so K3s never runs pods on a node without it.
pub const AGENT_UNIT: &str = "hexa-agent.service";

/// Where the unit file lives on the node.
pub fn unit_path(role: RoleKind) -> PathBuf {
    Path::new(paths::SYSTEMD_DIR).join(unit_name(role))
}

/// Where the unit's environment file lives on the node: beside the unit, named after it.
pub fn env_path(role: RoleKind) -> PathBuf {
    Path::new(paths::SYSTEMD_DIR).join(format!("{}.env", unit_name(role)))
}

/// A file the spec asks for: where on the node, what bytes, which mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredFile {
    pub path: PathBuf,
    pub contents: String,
    pub mode: u32,
}

/// Every file a spec asks for except the binary: config, unit, environment.
pub fn desired_files(spec: &K3sSpec) -> Vec<DesiredFile> {
    let role = spec.role.kind();
    vec![
        DesiredFile { path: PathBuf::from(paths::CONFIG), contents: config_yaml(spec), mode: SECRET_MODE },
        DesiredFile { path: unit_path(role), contents: systemd_unit(role), mode: UNIT_MODE },
        DesiredFile { path: env_path(role), contents: env_file(spec), mode: SECRET_MODE },
    ]
}

/// A YAML double-quoted scalar. JSON's string escapes are a subset of YAML's, so serde_json's
/// quoting is exact for any string, including `:`, `#`, `<`, quotes and non-ASCII.
fn yaml_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

fn taint_arg(taint: &Taint) -> String {
    // K3s parses `key=value:Effect`, and `key:Effect` for an empty value.
    if taint.value.is_empty() {
        format!("{}:{:?}", taint.key, taint.effect)
    } else {
        format!("{}={}:{:?}", taint.key, taint.value, taint.effect)
    }
}

/// `/etc/rancher/k3s/config.yaml`: one key per K3s flag, lists for the repeatable ones.
pub fn config_yaml(spec: &K3sSpec) -> String {
    let mut out =
        String::from("# Written by hexa-agent from this node's desired state. Local edits are overwritten.\n");
    let mut scalar = |key: &str, value: String| {
        out.push_str(key);
        out.push_str(": ");
        out.push_str(&value);
        out.push('\n');
    };
    if let K3sRole::Server { cluster_init: true, .. } = spec.role {
        scalar("cluster-init", "true".to_string());
    }
    if let Some(url) = spec.role.server_url() {
        scalar("server", yaml_string(url));
    }
    if let Some(token) = &spec.token {
        scalar("token", yaml_string(token.expose()));
    }
    if let Some(token) = &spec.agent_token {
        scalar("agent-token", yaml_string(token.expose()));
    }
    if let Some(name) = &spec.node_name {
        scalar("node-name", yaml_string(name));
    }
    if spec.with_node_id {
        scalar("with-node-id", "true".to_string());
    }
    let mut list = |key: &str, items: Vec<String>| {
        if items.is_empty() {
            return;
        }
        out.push_str(key);
        out.push_str(":\n");
        for item in items {
            out.push_str("  - ");
            out.push_str(&yaml_string(&item));
            out.push('\n');
        }
    };
    list("node-label", spec.node_labels.iter().map(|(k, v)| format!("{k}={v}")).collect());
    let mut taints: Vec<&Taint> = spec.node_taints.iter().collect();
    taints.sort();
    taints.dedup();
    list("node-taint", taints.into_iter().map(taint_arg).collect());
    list("kubelet-arg", spec.kubelet_args.iter().map(|(k, v)| format!("{k}={v}")).collect());
    out
}

/// The systemd unit, with the directives of K3s' installer: notify-type, the three environment
/// files, process kill mode (containers outlive a K3s restart), delegated cgroups, no resource
/// limits, no start timeout, restart always, and the br_netfilter and overlay modules loaded first;
/// and, unlike the installer's, started only after [`AGENT_UNIT`] is ready (`After=`) and never
/// without it (`Requires=`: if the agent cannot start, neither does K3s).
pub fn systemd_unit(role: RoleKind) -> String {
    let env = env_path(role);
    let bin = paths::BINARY;
    let agent = AGENT_UNIT;
    format!(
        "\
# Written by hexa-agent. Local edits are overwritten.
[Unit]
Description=Lightweight Kubernetes
Documentation=https://k3s.io
Wants=network-online.target
After=network-online.target {agent}
# Pods start only once the agent has put the node's tenant isolation in force.
Requires={agent}

[Install]
WantedBy=multi-user.target

[Service]
Type=notify
EnvironmentFile=-/etc/default/%N
EnvironmentFile=-/etc/sysconfig/%N
EnvironmentFile=-{env}
KillMode=process
Delegate=yes
User=root
# No resource limits on K3s itself: containers are accounted in their own cgroups, and per-process
# limits would only add kernel accounting overhead.
LimitNOFILE=1048576
LimitNPROC=infinity
LimitCORE=infinity
TasksMax=infinity
TimeoutStartSec=0
Restart=always
RestartSec=5s
ExecStartPre=-/sbin/modprobe br_netfilter
ExecStartPre=-/sbin/modprobe overlay
ExecStart={bin} {role}
",
        env = env.display(),
    )
}

/// A value in a systemd environment file: double-quoted, with `\` and `"` escaped (validation
/// already refused control characters).
fn env_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if c == '\\' || c == '"' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// `/etc/systemd/system/<unit>.env`: the service's environment (proxies, `K3S_*`,
/// `CONTAINERD_*`), mode 0600 as the installer makes it.
pub fn env_file(spec: &K3sSpec) -> String {
    let mut out = format!(
        "# Environment of {}, written by hexa-agent. Local edits are overwritten.\n",
        unit_name(spec.role.kind())
    );
    for (key, value) in &spec.environment {
        out.push_str(key);
        out.push('=');
        out.push_str(&env_value(value));
        out.push('\n');
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use hexa_shared::k3s::JoinToken;
    use hexa_shared::spec::TaintEffect;

    pub(crate) fn dedicated_agent() -> K3sSpec {
        let mut spec = K3sSpec {
            token: Some(JoinToken::new("K10f00d::server:0123456789abcdef")),
            node_name: Some("dedicated-7".into()),
            with_node_id: true,
            ..K3sSpec::new(K3sRole::Agent { server_url: "https://10.0.0.10:6443".into() })
        };
        spec.node_labels.insert("hexabase.ai/pool".into(), "dedicated".into());
        spec.node_labels.insert("tenant.hexabase.ai/acme".into(), "true".into());
        spec.node_taints.push(Taint {
            key: "hexabase.ai/dedicated".into(),
            value: "acme".into(),
            effect: TaintEffect::NoSchedule,
        });
        spec.kubelet_args.insert("system-reserved".into(), "cpu=500m,memory=1Gi".into());
        spec.kubelet_args.insert("kube-reserved".into(), "cpu=250m,memory=512Mi".into());
        spec.kubelet_args.insert("eviction-hard".into(), "memory.available<500Mi,nodefs.available<10%".into());
        spec.environment.insert("HTTPS_PROXY".into(), "http://proxy.internal:3128".into());
        spec.environment.insert("NO_PROXY".into(), "10.0.0.0/8,.svc,.cluster.local".into());
        spec
    }

    pub(crate) fn first_server() -> K3sSpec {
        let mut spec = K3sSpec {
            token: Some(JoinToken::new("K10f00d::server:0123456789abcdef")),
            ..K3sSpec::new(K3sRole::Server { cluster_init: true, server_url: None })
        };
        spec.node_labels.insert("hexabase.ai/pool".into(), "server".into());
        spec.kubelet_args.insert("system-reserved".into(), "cpu=1,memory=2Gi".into());
        spec
    }

    #[test]
    fn a_server_holds_the_agent_token_beside_its_own() {
        let spec = K3sSpec { agent_token: Some(JoinToken::new("0123456789abcdef-agent")), ..first_server() };
        let yaml = config_yaml(&spec);
        assert!(yaml.contains("\ntoken: \"K10f00d::server:0123456789abcdef\"\n"), "{yaml}");
        assert!(yaml.contains("\nagent-token: \"0123456789abcdef-agent\"\n"), "{yaml}");
        assert!(!config_yaml(&dedicated_agent()).contains("agent-token"));
    }

    #[test]
    fn config_of_a_joining_server() {
        let spec = K3sSpec {
            role: K3sRole::Server { cluster_init: false, server_url: Some("https://10.0.0.10:6443".into()) },
            ..first_server()
        };
        insta::assert_snapshot!(config_yaml(&spec));
    }

    #[test]
    fn agent_env_file() {
        let mut spec = dedicated_agent();
        spec.environment.insert("K3S_NODE_IP_HINT".into(), r#"a "quoted" \ value"#.into());
        insta::assert_snapshot!(env_file(&spec));
    }

    #[test]
    fn files_and_modes_follow_the_role() {
        let files = desired_files(&dedicated_agent());
        let listed: Vec<(String, u32)> = files.iter().map(|f| (f.path.display().to_string(), f.mode)).collect();
        assert_eq!(
            listed,
            [
                ("/etc/rancher/k3s/config.yaml".to_string(), 0o600),
                ("/etc/systemd/system/k3s-agent.service".to_string(), 0o644),
                ("/etc/systemd/system/k3s-agent.service.env".to_string(), 0o600),
            ]
        );
        let server = desired_files(&first_server());
        assert_eq!(server[1].path, Path::new("/etc/systemd/system/k3s.service"));
        assert_eq!(server[2].path, Path::new("/etc/systemd/system/k3s.service.env"));
        assert!(server[1].contents.contains("EnvironmentFile=-/etc/systemd/system/k3s.service.env\n"));
        assert!(server[1].contents.ends_with("ExecStart=/usr/local/bin/k3s server\n"));
    }

    #[test]
    fn awkward_values_stay_one_yaml_string() {
        // Values YAML would otherwise read as comments, mappings, booleans or numbers.
        let cases = [
            ("eviction-hard", "memory.available<5%", r#""eviction-hard=memory.available<5%""#),
            ("x", "a: b # c", r#""x=a: b # c""#),
            ("y", "quote\"back\\slash", r#""y=quote\"back\\slash""#),
        ];
        for (name, value, expected) in cases {
            let mut spec = first_server();
            spec.kubelet_args = [(name.to_string(), value.to_string())].into();
            let yaml = config_yaml(&spec);
            assert!(yaml.contains(&format!("  - {expected}\n")), "{yaml}");
        }
        let mut spec = first_server();
        spec.node_taints.push(Taint { key: "k".into(), value: String::new(), effect: TaintEffect::NoExecute });
        assert!(config_yaml(&spec).contains("node-taint:\n  - \"k:NoExecute\"\n"));
    }
}

//! Bad configuration files, through the binaries: `check-config` and a plain start both refuse
//! them with exit status 78 (EX_CONFIG, which the units do not restart on), naming the file, the
//! key and what to do. Good files pass `check-config` with status 0.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const EX_CONFIG: i32 = 78;

fn run(bin: &str, args: &[&str], config: &Path) -> Output {
    Command::new(hexa_tests::bin(bin))
        .args(args)
        .arg("--config")
        .arg(config)
        // A HEXA_* variable of the environment running the tests must not change the outcome.
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()
        .unwrap()
}

/// `check-config` and a start both refuse `config` with exit status 78 and a message holding every
/// one of `expected`; returns the message.
fn refused(bin: &str, config: &Path, expected: &[&str]) -> String {
    let mut messages = Vec::new();
    for args in [&["check-config"][..], &[][..]] {
        let out = run(bin, args, config);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(EX_CONFIG), "{bin} {args:?}: {out:?}");
        for want in expected {
            assert!(stderr.contains(want), "{bin} {args:?}: {want:?} missing from:\n{stderr}");
        }
        assert!(stderr.contains(&config.display().to_string()), "{bin} {args:?} names no file:\n{stderr}");
        messages.push(stderr);
    }
    assert_eq!(messages[0], messages[1], "check-config says what a start says");
    messages.remove(0)
}

fn file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// An agent config for a node that has not enrolled yet, with everything it needs to, plus `extra`.
fn agent_config(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let token = file(dir, "bootstrap.token", "abcdef.0123456789abcdef\n");
    let state = dir.join(format!("{name}-state"));
    let hash = format!("sha256:{}", "ab".repeat(32));
    let text = format!(
        "coordinator = \"coord.example:7443\"\nca_hash = \"{hash}\"\ntoken_file = \"{}\"\nstate_dir = \"{}\"\n{extra}",
        token.display(),
        state.display()
    );
    file(dir, name, &text)
}

#[test]
fn a_good_agent_config_passes_and_the_packaged_one_asks_for_enrollment() {
    let dir = tempfile::tempdir().unwrap();
    let good = agent_config(dir.path(), "good.toml", "");
    let out = run("hexa-agent", &["check-config"], &good);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("would start"), "{out:?}");
    // As installed, the node has no token yet: the package's own file says what to set.
    let packaged = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/agent.toml");
    let out =
        run("hexa-agent", &["check-config", "--state-dir", &dir.path().join("fresh").display().to_string()], &packaged);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EX_CONFIG), "{out:?}");
    assert!(stderr.contains("not enrolled yet") && stderr.contains("set token_file"), "{stderr}");
}

#[test]
fn the_agent_refuses_an_unknown_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = agent_config(dir.path(), "unknown.toml", "[reserved]\ncpu_milis = 500\n");
    refused(
        "hexa-agent",
        &config,
        &["line 6: unknown key `reserved.cpu_milis`", "expected one of", "remove it or correct its name"],
    );
    let config = agent_config(dir.path(), "top.toml", "coordinater = \"x:1\"\n");
    refused("hexa-agent", &config, &["line 5: unknown key `coordinater`"]);
}

#[test]
fn the_agent_refuses_a_value_of_the_wrong_type() {
    let dir = tempfile::tempdir().unwrap();
    let config = agent_config(dir.path(), "type.toml", "max_pods = \"many\"\n");
    refused(
        "hexa-agent",
        &config,
        &[
            "line 5: key `max_pods`: invalid type: string \"many\", expected u32",
            "write a value of the type the key takes",
        ],
    );
    let config = agent_config(dir.path(), "format.toml", "log_format = \"xml\"\n");
    refused("hexa-agent", &config, &["key `log_format`", "xml"]);
    // A string that is not what the key holds is refused at start too, before anything is done.
    let config = agent_config(dir.path(), "cidr.toml", "[isolation]\nbaseline_pod_cidr = \"10.42.0.0/33\"\n");
    refused("hexa-agent", &config, &["[isolation] baseline_pod_cidr: ", "set the cluster's pod network"]);
}

#[test]
fn the_agent_refuses_to_start_unenrolled_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let text = format!(
        "coordinator = \"coord.example:7443\"\nca_hash = \"sha256:{}\"\nstate_dir = \"{}\"\n",
        "ab".repeat(32),
        state.display()
    );
    let config = file(dir.path(), "no-token.toml", &text);
    refused(
        "hexa-agent",
        &config,
        &["not enrolled yet", "neither token nor token_file is set", "hexactl token create"],
    );
    // Without a CA pin it cannot enroll either.
    let config = agent_config(dir.path(), "no-pin.toml", "").display().to_string();
    let text = std::fs::read_to_string(&config).unwrap().replace(&format!("sha256:{}", "ab".repeat(32)), "");
    let config = file(dir.path(), "no-pin.toml", &text);
    refused("hexa-agent", &config, &["ca_hash is empty", "CA sha256:"]);
    // A malformed pin is named with its value.
    let text = text.replace("ca_hash = \"\"", "ca_hash = \"sha256:abc\"");
    let config = file(dir.path(), "bad-pin.toml", &text);
    refused("hexa-agent", &config, &["ca_hash = \"sha256:abc\" is not sha256:<64 hex digits>"]);
}

#[test]
fn the_agent_refuses_an_unreadable_or_empty_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = agent_config(dir.path(), "gone.toml", "");
    std::fs::remove_file(dir.path().join("bootstrap.token")).unwrap();
    refused(
        "hexa-agent",
        &config,
        &["cannot read the bootstrap token file", "bootstrap.token (token_file)", "check the path"],
    );
    std::fs::write(dir.path().join("bootstrap.token"), "\n").unwrap();
    refused("hexa-agent", &config, &["bootstrap.token (token_file) is empty", "hexactl token create"]);
    // Once the node has enrolled the token is not used again: a deleted token file is fine.
    std::fs::create_dir_all(dir.path().join("gone.toml-state")).unwrap();
    std::fs::write(dir.path().join("gone.toml-state/node.crt"), "").unwrap();
    let out = run("hexa-agent", &["check-config"], &config);
    assert!(out.status.success(), "{out:?}");
}

fn coordinator_config(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let base = hexa_tests::procs::fast_coordinator_config(dir, 17443, 17080);
    let text = std::fs::read_to_string(base).unwrap();
    // Top-level keys go before the first [section] of the base file.
    let (top, sections) = text.split_once("[k3s]").unwrap();
    let (extra_top, extra_sections) = match extra.find('[') {
        Some(i) => extra.split_at(i),
        None => (extra, ""),
    };
    file(dir, name, &format!("{top}{extra_top}[k3s]{sections}{extra_sections}"))
}

#[test]
fn a_good_coordinator_config_passes_and_so_does_the_packaged_one() {
    let dir = tempfile::tempdir().unwrap();
    let good = coordinator_config(dir.path(), "good.toml", "");
    let out = run("hexa-coordinator", &["check-config"], &good);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("would start"), "{out:?}");
    let packaged = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/coordinator.toml");
    let out = run("hexa-coordinator", &["check-config"], &packaged);
    assert!(out.status.success(), "{out:?}");
    assert!(!dir.path().join("state").exists(), "check-config creates nothing");
}

#[test]
fn the_coordinator_refuses_an_unknown_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = coordinator_config(dir.path(), "unknown.toml", "[placement]\novercomit = 2.0\n");
    refused("hexa-coordinator", &config, &["unknown key `placement.overcomit`", "remove it or correct its name"]);
}

#[test]
fn the_coordinator_refuses_a_value_of_the_wrong_type() {
    let dir = tempfile::tempdir().unwrap();
    let config = coordinator_config(dir.path(), "type.toml", "token_ttl = 3600\n");
    refused("hexa-coordinator", &config, &["line 7: key `token_ttl`", "write a value of the type the key takes"]);
    let config = coordinator_config(dir.path(), "bool.toml", "");
    let text = std::fs::read_to_string(&config).unwrap().replace("enabled = false", "enabled = \"no\"");
    let config = file(dir.path(), "bool.toml", &text);
    refused(
        "hexa-coordinator",
        &config,
        &["line 12: key `isolation.enabled`: invalid type: string \"no\", expected a boolean"],
    );
    let config = coordinator_config(dir.path(), "addr.toml", "");
    let text = std::fs::read_to_string(&config).unwrap().replace("127.0.0.1:17080", "localhost");
    let config = file(dir.path(), "addr.toml", &text);
    refused("hexa-coordinator", &config, &["line 3: key `admin_listen`: invalid socket address"]);
}

#[test]
fn the_coordinator_refuses_inconsistent_values_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = coordinator_config(dir.path(), "thresholds.toml", "");
    let text = std::fs::read_to_string(&config).unwrap().replace("lost_after = \"3s\"", "lost_after = \"500ms\"");
    let config = file(dir.path(), "thresholds.toml", &text);
    refused("hexa-coordinator", &config, &["lost_after (500ms) must be longer than unreachable_after (1s)"]);
}

#[test]
fn the_coordinator_refuses_an_unreadable_kubeconfig() {
    let dir = tempfile::tempdir().unwrap();
    let config = coordinator_config(dir.path(), "kube.toml", "");
    let missing = dir.path().join("k3s.yaml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("mode = \"off\"", &format!("mode = \"apply\"\nkubeconfig = \"{}\"", missing.display()));
    let config = file(dir.path(), "kube.toml", &text);
    refused(
        "hexa-coordinator",
        &config,
        &["hostcluster.kubeconfig", "k3s.yaml", "cannot read it", "mode = \"manifests\""],
    );
    assert!(!dir.path().join("state").exists(), "refused before anything was created");
}

#[test]
fn the_coordinator_refuses_a_store_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let config = coordinator_config(dir.path(), "backend.toml", "[store]\nbackend = \"etcd3\"\n");
    refused(
        "hexa-coordinator",
        &config,
        &["key `store.backend`", "unknown variant `etcd3`, expected `redb` or `etcd`"],
    );
    let config = coordinator_config(
        dir.path(),
        "tls.toml",
        "[store]\nbackend = \"etcd\"\nendpoints = [\"http://10.0.0.1:2379\"]\nca_file = \"/etc/etcd/ca.pem\"\n",
    );
    refused("hexa-coordinator", &config, &["store.endpoints", "\"http://10.0.0.1:2379\"", "write https://HOST:PORT"]);
    let missing = dir.path().join("etcd-ca.pem");
    let config = coordinator_config(
        dir.path(),
        "ca.toml",
        &format!(
            "[store]\nbackend = \"etcd\"\nendpoints = [\"https://10.0.0.1:2379\"]\nca_file = \"{}\"\n",
            missing.display()
        ),
    );
    refused("hexa-coordinator", &config, &["store.ca_file", "etcd-ca.pem", "cannot read it"]);
    assert!(!dir.path().join("state").exists(), "refused before anything was created");
}

//! The installer against a local artifact server, stand-in `k3s` executables, a recording
//! service manager and a temporary root.

use std::path::Path;
use std::time::Duration;

use hexa_shared::k3s::{ArtifactSource, K3sAction, K3sState, RoleKind};

use super::testkit::{self, ArtifactServer, Fault, V1, V2, agent_spec, quick_policy, read, server_spec, tree};
use super::*;

fn mtime_tick() {
    // Make a rewrite visible even on filesystems with coarse timestamps.
    std::thread::sleep(Duration::from_millis(20));
}

/// Installs `spec` under a fresh root and returns the root.
async fn installed(spec: &K3sSpec, systemd: &RecordingSystemd) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    apply(root.path(), spec, systemd, &testkit::fetcher(quick_policy())).await.unwrap();
    systemd.take_calls();
    root
}

async fn fresh_install(role: RoleKind) {
    testkit::init();
    let server = ArtifactServer::start(&[V2]).await;
    let spec = match role {
        RoleKind::Server => server_spec(server.source(), V2),
        RoleKind::Agent => agent_spec(server.source(), V2),
    };
    let unit = render::unit_name(role);
    let root = tempfile::tempdir().unwrap();
    let systemd = RecordingSystemd::new();

    let outcome = apply(root.path(), &spec, &systemd, &testkit::fetcher(quick_policy())).await.unwrap();

    assert_eq!(outcome.change, K3sChange::Installed { version: V2.into() });
    assert_eq!(outcome.restarted.as_deref(), Some(unit));
    let files = testkit::files_with_modes(root.path());
    let expected: BTreeMap<String, u32> = [
        ("usr/local/bin/k3s".to_string(), 0o755),
        ("etc/rancher/k3s/config.yaml".to_string(), 0o600),
        (format!("etc/systemd/system/{unit}"), 0o644),
        (format!("etc/systemd/system/{unit}.env"), 0o600),
        ("var/lib/hexabase/agent/k3s-installed.json".to_string(), 0o600),
    ]
    .into();
    assert_eq!(files, expected);
    assert_eq!(testkit::run_installed(root.path()), format!("k3s stand-in {V2}"));
    let config = read(root.path(), paths::CONFIG);
    let unit_text = read(root.path(), &format!("/etc/systemd/system/{unit}"));
    assert_eq!(config, render::config_yaml(&spec));
    assert_eq!(unit_text, render::systemd_unit(role));
    assert_eq!(read(root.path(), &format!("/etc/systemd/system/{unit}.env")), render::env_file(&spec));
    insta::assert_snapshot!(format!("{role}_config_yaml"), config);
    insta::assert_snapshot!(format!("{role}_unit"), unit_text);
    assert_eq!(
        systemd.calls(),
        [SystemdCall::DaemonReload, SystemdCall::Enable(unit.into()), SystemdCall::Restart(unit.into())]
    );
    let paths: Vec<String> = server.take_requests().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, [format!("/releases/{V2}/sha256sum-amd64.txt"), format!("/releases/{V2}/k3s")]);
    let record = super::installed(root.path()).unwrap().unwrap();
    assert_eq!((record.role, record.unit.as_str(), record.version.as_str()), (role, unit, V2));
    assert!(!record.restart_pending);
}

#[test]
fn apply_can_be_spawned_on_a_multi_threaded_runtime() {
    fn is_send<T: Send>(_: &T) {}
    testkit::init();
    let (systemd, fetcher) = (RecordingSystemd::new(), testkit::fetcher(quick_policy()));
    let spec = server_spec(ArtifactSource::default(), V2);
    let future = apply(Path::new("/nonexistent"), &spec, &systemd, &fetcher);
    is_send(&future);
    let readiness = ScriptedReadiness::new([]);
    is_send(&observe(Path::new("/nonexistent"), &systemd, &readiness, "n1"));
}

#[tokio::test]
async fn fresh_install_of_a_server() {
    fresh_install(RoleKind::Server).await;
}

#[tokio::test]
async fn fresh_install_of_an_agent() {
    fresh_install(RoleKind::Agent).await;
}

#[tokio::test]
async fn systemd_analyze_verify_accepts_the_installed_units() {
    testkit::init();
    let Ok(version) = std::process::Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd_analyze_verify_accepts_the_installed_units: SKIPPED, systemd-analyze is not installed");
        return;
    };
    assert!(version.status.success());
    let server = ArtifactServer::start(&[V2]).await;
    for spec in [server_spec(server.source(), V2), agent_spec(server.source(), V2)] {
        let systemd = RecordingSystemd::new();
        let root = installed(&spec, &systemd).await;
        let unit = render::unit_name(spec.role.kind());
        // systemd-analyze refuses a unit whose ExecStart does not exist: point it at the installed
        // stand-in. (The `-` of ExecStartPre=-/sbin/modprobe tolerates a missing modprobe.)
        let bin = root.path().join("usr/local/bin/k3s");
        let text = read(root.path(), &format!("/etc/systemd/system/{unit}"))
            .replace(paths::BINARY, &bin.display().to_string());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(unit);
        std::fs::write(&path, text).unwrap();
        let verify = || std::process::Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
        // K3s requires the agent's unit: without it the unit cannot start at all.
        let alone = verify();
        let stderr = String::from_utf8_lossy(&alone.stderr);
        assert!(!alone.status.success() && stderr.contains(render::AGENT_UNIT), "{unit}: {alone:?}");
        // Beside the packaged agent unit (and its slice) it verifies cleanly.
        let packaged = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
        for name in [render::AGENT_UNIT, "hexabase.slice"] {
            let text =
                std::fs::read_to_string(packaged.join(name)).unwrap().replace("/usr/bin/hexa-agent", "/bin/true");
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let output = verify();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success() && stderr.trim().is_empty(), "{unit}: {output:?}\n{stderr}");
    }
}

#[tokio::test]
async fn a_second_apply_of_the_same_spec_writes_nothing_and_restarts_nothing() {
    testkit::init();
    let server = ArtifactServer::start(&[V2]).await;
    for spec in [server_spec(server.source(), V2), agent_spec(server.source(), V2)] {
        let systemd = RecordingSystemd::new();
        let root = installed(&spec, &systemd).await;
        server.take_requests();
        let before = tree(root.path());
        mtime_tick();

        let outcome = apply(root.path(), &spec, &systemd, &testkit::fetcher(quick_policy())).await.unwrap();

        assert_eq!(outcome, K3sOutcome::new(K3sChange::Unchanged));
        assert_eq!(tree(root.path()), before, "no file written, created or removed");
        assert_eq!(systemd.calls(), [], "no restart, no reload");
        assert_eq!(server.take_requests(), [], "nothing downloaded, not even the checksum");
    }
}

#[tokio::test]
async fn an_upgrade_swaps_the_binary_and_restarts_once() {
    testkit::init();
    let server = ArtifactServer::start(&[V1, V2]).await;
    let systemd = RecordingSystemd::new();
    let root = installed(&server_spec(server.source(), V1), &systemd).await;
    assert_eq!(testkit::run_installed(root.path()), format!("k3s stand-in {V1}"));
    let before = tree(root.path());
    mtime_tick();

    let spec = server_spec(server.source(), V2);
    let outcome = apply(root.path(), &spec, &systemd, &testkit::fetcher(quick_policy())).await.unwrap();

    assert_eq!(outcome.change, K3sChange::Upgraded { from: V1.into(), to: V2.into() });
    assert_eq!(outcome.written, [PathBuf::from(paths::BINARY)]);
    assert_eq!(systemd.take_calls(), [SystemdCall::Restart("k3s.service".into())]);
    assert_eq!(testkit::run_installed(root.path()), format!("k3s stand-in {V2}"));
    let after = tree(root.path());
    for unchanged in
        ["etc/rancher/k3s/config.yaml", "etc/systemd/system/k3s.service", "etc/systemd/system/k3s.service.env"]
    {
        assert_eq!(after[Path::new(unchanged)], before[Path::new(unchanged)], "{unchanged} was rewritten");
    }
    assert_eq!(super::installed(root.path()).unwrap().unwrap().version, V2);
    // The download is not left behind.
    assert_eq!(std::fs::read_dir(root.path().join("var/lib/hexabase/agent/k3s-download")).unwrap().count(), 0);

    let again = apply(root.path(), &spec, &systemd, &testkit::fetcher(quick_policy())).await.unwrap();
    assert_eq!(again.change, K3sChange::Unchanged);
    assert_eq!(systemd.calls(), []);
}

#[tokio::test]
async fn a_failed_download_leaves_the_installed_binary_running() {
    testkit::init();
    let cases = [
        (Fault::WrongChecksum, "has sha256"),
        (Fault::Truncate(10), "gave up after 3 attempts: "),
        (Fault::NotFound, "does not exist (HTTP 404)"),
        (Fault::HangHeaders, "no response within 400ms"),
        (Fault::HangBody, "no data within 400ms"),
    ];
    for (fault, why) in cases {
        let server = ArtifactServer::start(&[V1, V2]).await;
        let systemd = RecordingSystemd::new();
        let root = installed(&server_spec(server.source(), V1), &systemd).await;
        let before = tree(root.path());
        let installed_files: Vec<_> = before.keys().filter(|p| !p.starts_with("var/lib/hexabase")).cloned().collect();
        server.set_fault(fault);

        let started = std::time::Instant::now();
        let err = apply(root.path(), &server_spec(server.source(), V2), &systemd, &testkit::fetcher(quick_policy()))
            .await
            .unwrap_err();

        let reason = err.to_string();
        assert!(reason.contains(why), "{fault:?}: {reason}");
        assert!(reason.contains(&format!("cannot get k3s {V2}")), "{fault:?}: {reason}");
        assert!(reason.contains(&format!("k3s {V1} is left installed as it was")), "{fault:?}: {reason}");
        assert_eq!(err.to_state(), K3sState::Failed { reason: reason.clone() });
        assert!(started.elapsed() < Duration::from_secs(10), "{fault:?} took {:?}", started.elapsed());
        assert_eq!(testkit::run_installed(root.path()), format!("k3s stand-in {V1}"), "{fault:?}");
        let after = tree(root.path());
        for path in &installed_files {
            assert_eq!(after.get(path), before.get(path), "{fault:?}: {} changed", path.display());
        }
        assert_eq!(systemd.calls(), [], "{fault:?}: nothing restarted");
        assert_eq!(super::installed(root.path()).unwrap().unwrap().version, V1);
    }
}

#[tokio::test]
async fn an_interrupted_download_resumes_where_it_stopped() {
    testkit::init();
    let server = ArtifactServer::start(&[V1, V2]).await;
    let systemd = RecordingSystemd::new();
    let root = installed(&server_spec(server.source(), V1), &systemd).await;
    server.set_fault(Fault::Truncate(100));
    let spec = server_spec(server.source(), V2);

    // One attempt per apply: the first apply fails with 100 bytes kept, later ones continue.
    let one_attempt = testkit::fetcher(FetchPolicy { attempts: 1, ..quick_policy() });
    server.take_requests();
    assert!(apply(root.path(), &spec, &systemd, &one_attempt).await.is_err());
    let outcome =
        apply(root.path(), &spec, &systemd, &testkit::fetcher(FetchPolicy { attempts: 10, ..quick_policy() }))
            .await
            .unwrap();

    assert_eq!(outcome.change, K3sChange::Upgraded { from: V1.into(), to: V2.into() });
    assert_eq!(testkit::run_installed(root.path()), format!("k3s stand-in {V2}"));
    let ranges: Vec<Option<String>> =
        server.take_requests().into_iter().filter(|s| s.path.ends_with("/k3s")).map(|s| s.range).collect();
    assert_eq!(ranges[..3], [None, Some("bytes=100-".into()), Some("bytes=200-".into())]);
    assert_eq!(systemd.calls(), [SystemdCall::Restart("k3s.service".into())]);
}

#[tokio::test]
async fn uninstall_removes_exactly_what_was_installed() {
    testkit::init();
    let server = ArtifactServer::start(&[V2]).await;
    let root = tempfile::tempdir().unwrap();
    // What the node had before: other files in the same directories, and the agent's own state.
    for (path, contents) in [
        ("etc/rancher/k3s/registries.yaml", "mirrors: {}\n"),
        ("etc/systemd/system/hexa-agent.service", "[Service]\n"),
        ("usr/local/bin/hexa-agent", "binary"),
        ("var/lib/hexabase/agent/spec.json", "{}"),
    ] {
        let path = root.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
    }
    let before = tree(root.path());
    let systemd = RecordingSystemd::new();
    let fetcher = testkit::fetcher(quick_policy());
    let spec = agent_spec(server.source(), V2);
    apply(root.path(), &spec, &systemd, &fetcher).await.unwrap();
    let record = super::installed(root.path()).unwrap().unwrap();
    systemd.take_calls();

    let uninstall = K3sSpec { action: K3sAction::Uninstall, ..spec.clone() };
    let outcome = apply(root.path(), &uninstall, &systemd, &fetcher).await.unwrap();

    assert_eq!(outcome.change, K3sChange::Uninstalled);
    let mut recorded: Vec<PathBuf> = record.files.keys().cloned().chain([record.binary.path.clone()]).collect();
    recorded.sort();
    assert_eq!(outcome.removed, recorded);
    assert_eq!(tree(root.path()), before, "exactly what was installed is gone; everything else is as it was");
    assert_eq!(
        systemd.take_calls(),
        [
            SystemdCall::Stop("k3s-agent.service".into()),
            SystemdCall::Disable("k3s-agent.service".into()),
            SystemdCall::DaemonReload
        ]
    );

    let again = apply(root.path(), &uninstall, &systemd, &fetcher).await.unwrap();
    assert_eq!(again.change, K3sChange::NothingToUninstall);
    assert_eq!(systemd.calls(), []);
}

#[tokio::test]
async fn uninstall_leaves_a_k3s_the_agent_did_not_install() {
    testkit::init();
    let root = tempfile::tempdir().unwrap();
    let bin = root.path().join("usr/local/bin/k3s");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::write(&bin, "someone else's").unwrap();
    let systemd = RecordingSystemd::new();
    let spec = K3sSpec { action: K3sAction::Uninstall, ..server_spec(ArtifactSource::default(), V2) };

    let outcome = apply(root.path(), &spec, &systemd, &testkit::fetcher(quick_policy())).await.unwrap();

    assert_eq!(outcome.change, K3sChange::NothingToUninstall);
    assert_eq!(std::fs::read_to_string(bin).unwrap(), "someone else's");
    assert_eq!(systemd.calls(), []);
}

#[tokio::test]
async fn a_role_change_is_refused_unless_the_spec_says_reinstall() {
    testkit::init();
    let server = ArtifactServer::start(&[V2]).await;
    let systemd = RecordingSystemd::new();
    let root = installed(&server_spec(server.source(), V2), &systemd).await;
    server.take_requests();
    let before = tree(root.path());
    let fetcher = testkit::fetcher(quick_policy());

    let agent = agent_spec(server.source(), V2);
    let err = apply(root.path(), &agent, &systemd, &fetcher).await.unwrap_err();
    assert!(matches!(err, K3sError::RoleChangeRefused { installed: RoleKind::Server, requested: RoleKind::Agent, .. }));
    let reason = err.to_string();
    assert!(reason.contains("installed on this node as server (k3s.service) and the spec asks for agent"), "{reason}");
    assert!(reason.contains("set the spec's action to reinstall"), "{reason}");
    assert_eq!(tree(root.path()), before);
    assert_eq!(systemd.calls(), []);

    let reinstall = K3sSpec { action: K3sAction::Reinstall, ..agent };
    let outcome = apply(root.path(), &reinstall, &systemd, &fetcher).await.unwrap();
    assert_eq!(outcome.change, K3sChange::Reinstalled { from: RoleKind::Server });
    assert_eq!(
        outcome.removed,
        [PathBuf::from("/etc/systemd/system/k3s.service"), PathBuf::from("/etc/systemd/system/k3s.service.env")]
    );
    assert_eq!(
        systemd.take_calls(),
        [
            SystemdCall::Stop("k3s.service".into()),
            SystemdCall::Disable("k3s.service".into()),
            SystemdCall::DaemonReload,
            SystemdCall::Enable("k3s-agent.service".into()),
            SystemdCall::Restart("k3s-agent.service".into()),
        ]
    );
    let files = testkit::files_with_modes(root.path());
    assert!(!files.contains_key("etc/systemd/system/k3s.service"));
    assert!(files.contains_key("etc/systemd/system/k3s-agent.service"));
    assert_eq!(server.take_requests(), [], "same version: the binary is kept");

    // Reinstall stays in the spec; once done it is a no-op like any other apply.
    let again = apply(root.path(), &reinstall, &systemd, &fetcher).await.unwrap();
    assert_eq!(again.change, K3sChange::Unchanged);
    assert_eq!(systemd.calls(), []);
}

#[tokio::test]
async fn an_interrupted_reinstall_finishes_on_the_next_apply() {
    testkit::init();
    let server = ArtifactServer::start(&[V2]).await;
    let systemd = RecordingSystemd::new();
    let root = installed(&server_spec(server.source(), V2), &systemd).await;
    let fetcher = testkit::fetcher(quick_policy());
    let reinstall = K3sSpec { action: K3sAction::Reinstall, ..agent_spec(server.source(), V2) };
    systemd.fail_restarts(Some("Job for k3s-agent.service failed"));

    apply(root.path(), &reinstall, &systemd, &fetcher).await.unwrap_err();
    let record = super::installed(root.path()).unwrap().unwrap();
    assert_eq!((record.retiring_unit.as_deref(), record.restart_pending), (Some("k3s.service"), true));
    systemd.fail_restarts(None);
    systemd.take_calls();

    let outcome = apply(root.path(), &reinstall, &systemd, &fetcher).await.unwrap();
    assert_eq!(outcome.restarted.as_deref(), Some("k3s-agent.service"));
    // The old unit's file is already gone: stop it again, nothing to disable; reload since the
    // record still listed the old unit's files.
    assert_eq!(
        systemd.take_calls(),
        [
            SystemdCall::Stop("k3s.service".into()),
            SystemdCall::DaemonReload,
            SystemdCall::Restart("k3s-agent.service".into())
        ]
    );
    let record = super::installed(root.path()).unwrap().unwrap();
    assert_eq!((record.retiring_unit, record.restart_pending), (None, false));
}

#[tokio::test]
async fn a_config_change_rewrites_only_the_config_and_restarts() {
    testkit::init();
    let server = ArtifactServer::start(&[V2]).await;
    let systemd = RecordingSystemd::new();
    let spec = agent_spec(server.source(), V2);
    let root = installed(&spec, &systemd).await;
    server.take_requests();

    let mut changed = spec.clone();
    changed.kubelet_args.insert("max-pods".into(), "250".into());
    let outcome = apply(root.path(), &changed, &systemd, &testkit::fetcher(quick_policy())).await.unwrap();

    assert_eq!(outcome.change, K3sChange::Reconfigured);
    assert_eq!(outcome.written, [PathBuf::from(paths::CONFIG)]);
    assert!(read(root.path(), paths::CONFIG).contains("  - \"max-pods=250\"\n"));
    assert_eq!(systemd.calls(), [SystemdCall::Restart("k3s-agent.service".into())]);
    assert_eq!(server.take_requests(), []);
}

#[tokio::test]
async fn a_stopped_service_is_started_without_writing() {
    testkit::init();
    let server = ArtifactServer::start(&[V2]).await;
    let systemd = RecordingSystemd::new();
    let spec = server_spec(server.source(), V2);
    let root = installed(&spec, &systemd).await;
    systemd.set_active("k3s.service", false);
    let before = tree(root.path());

    let outcome = apply(root.path(), &spec, &systemd, &testkit::fetcher(quick_policy())).await.unwrap();

    assert_eq!(outcome.change, K3sChange::Started);
    assert_eq!(systemd.calls(), [SystemdCall::Restart("k3s.service".into())]);
    assert_eq!(tree(root.path()), before);
}

#[tokio::test]
async fn a_failed_restart_is_retried_by_the_next_apply() {
    testkit::init();
    let server = ArtifactServer::start(&[V2]).await;
    let systemd = RecordingSystemd::new();
    let spec = server_spec(server.source(), V2);
    let root = tempfile::tempdir().unwrap();
    let fetcher = testkit::fetcher(quick_policy());
    systemd.fail_restarts(Some("Job for k3s.service failed"));

    let err = apply(root.path(), &spec, &systemd, &fetcher).await.unwrap_err();
    assert!(err.to_string().contains("Job for k3s.service failed; the files are in place and the next apply retries"));
    assert!(super::installed(root.path()).unwrap().unwrap().restart_pending);
    systemd.fail_restarts(None);
    systemd.take_calls();
    let before = tree(root.path());
    mtime_tick();

    let outcome = apply(root.path(), &spec, &systemd, &fetcher).await.unwrap();
    assert_eq!(outcome.restarted.as_deref(), Some("k3s.service"));
    assert_eq!(systemd.calls(), [SystemdCall::Restart("k3s.service".into())]);
    assert!(!super::installed(root.path()).unwrap().unwrap().restart_pending);
    let after = tree(root.path());
    for (path, entry) in &before {
        if !path.ends_with("k3s-installed.json") {
            assert_eq!(after.get(path), Some(entry), "{} rewritten", path.display());
        }
    }
}

#[tokio::test]
async fn a_tampered_binary_is_replaced() {
    testkit::init();
    let server = ArtifactServer::start(&[V2]).await;
    let systemd = RecordingSystemd::new();
    let spec = server_spec(server.source(), V2);
    let root = installed(&spec, &systemd).await;
    std::fs::write(root.path().join("usr/local/bin/k3s"), "#!/bin/sh\necho tampered\n").unwrap();

    let outcome = apply(root.path(), &spec, &systemd, &testkit::fetcher(quick_policy())).await.unwrap();

    assert_eq!(outcome.change, K3sChange::Reconfigured);
    assert_eq!(outcome.written, [PathBuf::from(paths::BINARY)]);
    assert_eq!(testkit::run_installed(root.path()), format!("k3s stand-in {V2}"));
    assert_eq!(systemd.calls(), [SystemdCall::Restart("k3s.service".into())]);
}

#[tokio::test]
async fn air_gapped_nodes_install_from_a_directory() {
    testkit::init();
    let root = tempfile::tempdir().unwrap();
    let source = ArtifactSource::AirGap { dir: "/srv/k3s".into() };
    let spec = agent_spec(source, V2);
    let systemd = RecordingSystemd::new();
    let fetcher = testkit::fetcher(quick_policy());

    let err = apply(root.path(), &spec, &systemd, &fetcher).await.unwrap_err().to_string();
    assert!(err.contains(&format!("srv/k3s/{V2}/sha256sum-amd64.txt is missing")), "{err}");
    assert!(err.contains("nothing was installed"), "{err}");

    for (name, bytes) in testkit::release_files(V2) {
        let path = root.path().join("srv/k3s").join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    let outcome = apply(root.path(), &spec, &systemd, &fetcher).await.unwrap();
    assert_eq!(outcome.change, K3sChange::Installed { version: V2.into() });
    assert_eq!(testkit::run_installed(root.path()), format!("k3s stand-in {V2}"));

    // A corrupted air-gap copy of another version is refused, and the installed one stays.
    for (name, bytes) in testkit::release_files(V1) {
        let path = root.path().join("srv/k3s").join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    std::fs::write(root.path().join("srv/k3s").join(V1).join("k3s"), "corrupt").unwrap();
    let downgrade = K3sSpec { version: V1.into(), ..spec };
    let err = apply(root.path(), &downgrade, &systemd, &fetcher).await.unwrap_err().to_string();
    assert!(err.contains("has sha256") && err.contains(&format!("k3s {V2} is left installed")), "{err}");
    assert_eq!(testkit::run_installed(root.path()), format!("k3s stand-in {V2}"));
}

#[tokio::test]
async fn an_invalid_spec_touches_nothing() {
    testkit::init();
    let server = ArtifactServer::start(&[V2]).await;
    let root = tempfile::tempdir().unwrap();
    let systemd = RecordingSystemd::new();
    let spec = K3sSpec { version: "latest".into(), ..server_spec(server.source(), V2) };

    let err = apply(root.path(), &spec, &systemd, &testkit::fetcher(quick_policy())).await.unwrap_err();

    assert!(err.to_string().starts_with("invalid K3s spec: k3s version \"latest\" is not a K3s release tag"), "{err}");
    assert_eq!(tree(root.path()), BTreeMap::new());
    assert_eq!(server.take_requests(), []);
    assert_eq!(systemd.calls(), []);
}

#[tokio::test]
async fn observe_reports_each_state() {
    testkit::init();
    let server = ArtifactServer::start(&[V2]).await;
    let root = tempfile::tempdir().unwrap();
    let systemd = RecordingSystemd::new();
    let not_ready = ScriptedReadiness::new([Ok(false)]);
    assert_eq!(observe(root.path(), &systemd, &not_ready, "n1").await, K3sState::NotInstalled);

    apply(root.path(), &agent_spec(server.source(), V2), &systemd, &testkit::fetcher(quick_policy())).await.unwrap();
    assert_eq!(observe(root.path(), &systemd, &not_ready, "n1").await, K3sState::Installing);
    assert_eq!(
        not_ready.asked(),
        [(root.path().join("var/lib/rancher/k3s/agent/kubelet.kubeconfig"), "n1".to_string())]
    );
    let ready = ScriptedReadiness::new([Ok(true)]);
    let running = K3sState::Running { version: V2.into(), cluster_ca_sha256: None };
    assert_eq!(observe(root.path(), &systemd, &ready, "n1").await, running, "an agent speaks for no CA");

    systemd.set_active("k3s-agent.service", false);
    let K3sState::Failed { reason } = observe(root.path(), &systemd, &ready, "n1").await else { panic!("not failed") };
    assert!(reason.contains("k3s-agent.service is not running: see `journalctl -u k3s-agent.service`"), "{reason}");
}

#[tokio::test]
async fn a_running_server_reports_the_hash_of_its_cluster_ca() {
    testkit::init();
    let server = ArtifactServer::start(&[V2]).await;
    let systemd = RecordingSystemd::new();
    let root = installed(&server_spec(server.source(), V2), &systemd).await;
    systemd.set_active("k3s.service", true);
    let ready = ScriptedReadiness::new([Ok(true)]);
    let running = |ca| K3sState::Running { version: V2.into(), cluster_ca_sha256: ca };
    // Before K3s has written its CA there is nothing to speak for.
    assert_eq!(observe(root.path(), &systemd, &ready, "s1").await, running(None));
    let pem = b"-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n";
    let ca = root.path().join("var/lib/rancher/k3s/server/tls/server-ca.crt");
    std::fs::create_dir_all(ca.parent().unwrap()).unwrap();
    std::fs::write(&ca, pem).unwrap();
    // The hash K3s' own secure tokens carry: sha256 of the PEM file as it is on disk.
    let want = hex::encode(Sha256::digest(pem));
    assert_eq!(observe(root.path(), &systemd, &ready, "s1").await, running(Some(want)));
}

#[tokio::test]
async fn a_pinned_checksum_is_trusted_over_the_release_listing() {
    testkit::init();
    let server = ArtifactServer::start(&[V2]).await;
    let ArtifactSource::Url { base, .. } = server.source() else { panic!("a URL source") };
    let good = hex::encode(Sha256::digest(testkit::stand_in(V2, "amd64")));
    // The listing is wrong, as a tampered mirror's would be; the operator's pin decides.
    server.set_fault(Fault::WrongChecksum);
    let pinned =
        |sha256: &str| server_spec(ArtifactSource::Url { base: base.clone(), sha256: Some(sha256.into()) }, V2);
    let systemd = RecordingSystemd::new();
    let root = tempfile::tempdir().unwrap();
    apply(root.path(), &pinned(&good), &systemd, &testkit::fetcher(quick_policy())).await.unwrap();
    assert_eq!(testkit::run_installed(root.path()), format!("k3s stand-in {V2}"));
    let other = tempfile::tempdir().unwrap();
    let err = apply(other.path(), &pinned(&"0".repeat(64)), &systemd, &testkit::fetcher(quick_policy()))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("pin in the coordinator's [k3s] sha256") && err.contains(&"0".repeat(64)), "{err}");
    assert!(!other.path().join("usr/local/bin/k3s").exists(), "nothing installed from a mismatch");
}

//! The packaged systemd units pass `systemd-analyze verify`, silently, are notify services with a
//! watchdog that restart on failure, and keep the hardening `systemd-analyze security` measures.

use std::process::Command;

#[test]
fn units_verify_cleanly() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        panic!("systemd-analyze is missing: install the systemd package (the README's test command does)");
    };
    assert!(out.status.success());
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = hexa_tests::bin("hexa-agent").parent().unwrap().display().to_string();
    let mut units = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        // verify checks that ExecStart exists: point it at the binaries just built.
        let text = std::fs::read_to_string(&path).unwrap().replace("/usr/bin/", &format!("{bin_dir}/"));
        std::fs::write(dir.path().join(&name), text).unwrap();
        units.push(name);
    }
    units.sort();
    assert_eq!(units, ["hexa-agent.service", "hexa-coordinator.service", "hexabase.slice"]);
    let out = Command::new("systemd-analyze").arg("verify").args(&units).current_dir(dir.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on directives it ignores; any message at all is a defect here.
    assert!(out.status.success() && stderr.trim().is_empty() && out.stdout.is_empty(), "{stderr}");

    // The check has teeth: a misspelt directive is reported.
    let broken = dir.path().join("hexa-agent.service");
    let text = std::fs::read_to_string(&broken).unwrap().replace("Type=notify", "Type=notfiy");
    std::fs::write(&broken, text).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "hexa-agent.service"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).trim().is_empty());
}

/// `systemd-analyze security --offline=yes` of a packaged unit: its overall exposure (0 is
/// perfect, 10 is none at all) and the lines naming what is left open.
fn exposure(unit: &str) -> (f64, String) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd").join(unit);
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&path)
        .output()
        .expect("systemd-analyze is installed (the README's test command installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let level = text
        .lines()
        .find_map(|l| l.split_once(&format!("Overall exposure level for {unit}: ")))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or_else(|| {
            panic!("no overall exposure level for {unit} in: {text}\n{}", String::from_utf8_lossy(&out.stderr))
        });
    (level, text)
}

/// The scores the README gives. A change that loosens a unit beyond them fails here: tighten the
/// unit, or say in the README why it has to be looser and what it now scores.
#[test]
fn hardening_keeps_the_scores_the_readme_gives() {
    let (coordinator, report) = exposure("hexa-coordinator.service");
    assert!(coordinator <= 1.1, "hexa-coordinator.service exposure {coordinator} (README: 1.1 OK):\n{report}");
    let (agent, report) = exposure("hexa-agent.service");
    assert!(agent <= 3.4, "hexa-agent.service exposure {agent} (README: 3.4 OK):\n{report}");
    // The measurement has teeth: the agent's unit without its sandbox scores far worse.
    let dir = tempfile::tempdir().unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/hexa-agent.service");
    let bare: String = std::fs::read_to_string(src)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("Protect") && !l.starts_with("Restrict") && !l.starts_with("CapabilityBoundingSet"))
        .map(|l| format!("{l}\n"))
        .collect();
    let bare_path = dir.path().join("hexa-agent.service");
    std::fs::write(&bare_path, bare).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&bare_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let bare_level: f64 = text
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for hexa-agent.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(bare_level > agent + 2.0, "unhardened {bare_level} vs hardened {agent}");
}

/// Both daemons tell systemd when they are ready and feed a watchdog, and systemd restarts them
/// when they fail (not when an operator stops them), as `systemctl show` would report the unit.
#[test]
fn both_services_notify_and_are_watched() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    for unit in ["hexa-agent.service", "hexa-coordinator.service"] {
        let text = std::fs::read_to_string(src.join(unit)).unwrap();
        let value = |key: &str| {
            let values: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix(&format!("{key}="))).collect();
            assert_eq!(values.len(), 1, "{unit}: {key}= {values:?}");
            values[0].to_string()
        };
        assert_eq!(value("Type"), "notify", "{unit}");
        assert_eq!(value("NotifyAccess"), "main", "{unit}");
        assert_eq!(value("Restart"), "on-failure", "{unit}");
        let watchdog = humantime::parse_duration(&value("WatchdogSec")).unwrap();
        assert!(watchdog >= std::time::Duration::from_secs(10), "{unit}: WatchdogSec={watchdog:?}");
    }
}

//! The packaged systemd units pass `systemd-analyze verify`, silently.

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
    let text = std::fs::read_to_string(&broken).unwrap().replace("Type=exec", "Type=exce");
    std::fs::write(&broken, text).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "hexa-agent.service"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).trim().is_empty());
}

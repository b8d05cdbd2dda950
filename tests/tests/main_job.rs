//! The README's first command: a coordinator and three agents on embedded defaults.

use std::process::Command;

#[test]
fn run_local_brings_up_three_ready_nodes_with_live_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = hexa_tests::bin("hexa-coordinator").parent().unwrap().to_path_buf();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/run-local");
    let run = |extra: &[&str]| {
        Command::new(&script)
            .args(extra)
            .arg("--check")
            .env("HEXA_SKIP_BUILD", "1")
            .env("HEXA_BIN_DIR", &bin_dir)
            .env("HEXA_LOCAL_DIR", dir.path())
            .env("HEXA_LOCAL_QUIC_PORT", hexa_tests::free_port().to_string())
            .env("HEXA_LOCAL_ADMIN_PORT", hexa_tests::free_port().to_string())
            .output()
            .expect("run scripts/run-local")
    };
    let out = run(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with("local-")).collect();
    assert_eq!(rows.len(), 3, "{stdout}");
    for row in rows {
        assert!(row.contains(" shared ") && row.contains(" Ready "), "{row}");
        assert!(row.contains("GiB free of"), "live capacity shown: {row}");
    }
    assert!(dir.path().join("coordinator/admin.token").exists());
    // A second run reuses the state: same CA, the nodes come back without new tokens.
    let out = run(&[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let again = String::from_utf8_lossy(&out.stdout);
    assert_eq!(again.lines().filter(|l| l.starts_with("local-") && l.contains(" Ready ")).count(), 3, "{again}");
}

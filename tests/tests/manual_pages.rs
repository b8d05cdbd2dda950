//! The packaged manual pages (`packaging/man/`) keep up with the binaries: every option and command
//! `--help` lists is described in the page, and every option the page describes exists. `groff`
//! renders each page without a warning when it is installed (lintian runs the same check).

use std::process::Command;

fn help(bin: &str) -> String {
    let out = Command::new(hexa_tests::bin(bin)).arg("--help").output().unwrap();
    assert!(out.status.success(), "{bin} --help: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Long options (`--name`) and commands of a clap `--help` text.
fn options_and_commands(help: &str) -> (Vec<String>, Vec<String>) {
    let mut options = Vec::new();
    let mut commands = Vec::new();
    let mut in_commands = false;
    for line in help.lines() {
        if line.starts_with("Commands:") {
            in_commands = true;
            continue;
        }
        if !line.starts_with(' ') {
            in_commands = false;
        }
        let trimmed = line.trim_start();
        if in_commands {
            if let Some(name) = trimmed.split_whitespace().next().filter(|n| *n != "help") {
                commands.push(name.to_string());
            }
        } else if let Some(at) = trimmed.find("--") {
            let name: String =
                trimmed[at + 2..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
            if !name.is_empty() && !options.contains(&name) {
                options.push(name);
            }
        }
    }
    (options, commands)
}

/// Long options a manual page describes in its OPTIONS section (`.BI \-\-name` or `.BR \-\-name`).
fn page_options(page: &str) -> Vec<String> {
    let section = page.split(".SH OPTIONS").nth(1).unwrap_or_default().split(".SH ").next().unwrap_or_default();
    section
        .lines()
        .filter(|l| l.starts_with(".B"))
        .flat_map(|l| {
            l.split("\\-\\-").skip(1).map(|rest| {
                rest.chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '\\' || *c == '-')
                    .collect::<String>()
                    .replace("\\-", "-")
            })
        })
        .map(|name| name.trim_end_matches('\\').to_string())
        .collect()
}

#[test]
fn every_option_and_command_is_in_the_manual_page_and_nothing_else() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/man");
    for (bin, page) in
        [("hexa-agent", "hexa-agent.8"), ("hexa-coordinator", "hexa-coordinator.8"), ("hexactl", "hexactl.1")]
    {
        let text = std::fs::read_to_string(dir.join(page)).unwrap();
        let (options, commands) = options_and_commands(&help(bin));
        assert!(!options.is_empty() && !commands.is_empty(), "{bin}: nothing read from --help");
        let described = page_options(&text);
        for option in &options {
            assert!(described.contains(option), "{page} does not describe --{option} of {bin} (it has {described:?})");
        }
        for option in &described {
            assert!(options.contains(option), "{page} describes --{option}, which {bin} does not have");
        }
        for command in &commands {
            assert!(
                text.contains(&format!(".B {command}"))
                    || text.contains(&format!(".BI {command}"))
                    || text.contains(&format!(".BI \"{command}")),
                "{page} does not describe the command {command} of {bin}"
            );
        }
    }
}

#[test]
fn the_manual_pages_render_without_warnings() {
    if Command::new("groff").arg("--version").output().is_err() {
        eprintln!(
            "skipped the_manual_pages_render_without_warnings: groff is not installed (apt-get install groff-base)"
        );
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/man");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let out = Command::new("groff").args(["-man", "-Tutf8", "-ww", "-z"]).arg(&path).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && stderr.trim().is_empty(), "{}: {stderr}", path.display());
    }
}

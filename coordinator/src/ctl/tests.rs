use super::*;

#[test]
fn completion_scripts_know_the_commands() {
    for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
        let script = completions(shell);
        for word in ["reenroll", "set-plan", "provisioning", "token-file"] {
            assert!(script.contains(word), "{shell}: {word}");
        }
    }
}

#[test]
fn tables_align_columns() {
    let out = table(&["A", "LONG"], &[vec!["xyz".into(), "1".into()], vec!["q".into(), "22".into()]]);
    assert_eq!(out, "A    LONG\nxyz  1\nq    22\n");
}

#[test]
fn conditions_show_how_long_they_have_held() {
    use hexa_shared::tenant::{Condition, ConditionType, Plan, SharedPlan, Tenant};
    let tenant = Tenant {
        name: "acme".into(),
        plan: Plan::Shared(SharedPlan { cpu_millis: 1000, memory_bytes: 1 << 30, pods: 10, replicas: 1, spread: 1 }),
        phase: Default::default(),
        conditions: vec![Condition {
            kind: ConditionType::Deployed,
            status: false,
            reason: "Deploying".into(),
            message: "waiting for the install Job".into(),
            last_transition_unix_ms: 1_000,
        }],
        placement: Default::default(),
    };
    let out = conditions_table(&tenant, 1_000 + 95_000);
    let row = out.lines().nth(1).unwrap();
    assert!(row.starts_with("Deployed") && row.contains("false") && row.contains("1m 35s"), "{out}");
}

#[test]
fn control_characters_cannot_break_a_table() {
    let out = table(&["DESCRIPTION"], &[vec!["rack 4\n\u{1b}[31mred".into()]]);
    assert_eq!(out, "DESCRIPTION\nrack 4\\n\\u{1b}[31mred\n");
}

fn flags(args: &[&str]) -> PlanArgs {
    #[derive(clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        plan: PlanArgs,
    }
    let mut argv = vec!["hexactl"];
    argv.extend_from_slice(args);
    <Wrapper as clap::Parser>::parse_from(argv).plan
}

#[test]
fn flags_left_out_keep_the_tenant_s_current_plan() {
    use hexa_shared::tenant::{DedicatedPlan, Plan, SharedPlan};
    let ha = Plan::Shared(SharedPlan { cpu_millis: 3000, memory_bytes: 3 << 30, pods: 30, replicas: 3, spread: 3 });
    let resized = flags(&["--cpu", "700m", "--memory", "768Mi", "--pods", "9"]).over(Some(&ha)).unwrap();
    assert_eq!(
        resized,
        Plan::Shared(SharedPlan { cpu_millis: 700, memory_bytes: 768 << 20, pods: 9, replicas: 3, spread: 3 })
    );
    // A new tenant gets the documented defaults.
    let new = flags(&["--cpu", "1", "--memory", "1Gi"]).to_plan().unwrap();
    assert_eq!(
        new,
        Plan::Shared(SharedPlan { cpu_millis: 1000, memory_bytes: 1 << 30, pods: 100, replicas: 1, spread: 1 })
    );
    // A flag of the other kind of plan is refused, saying what to do.
    let err = flags(&["--class", "M"]).over(Some(&ha)).unwrap_err().to_string();
    assert!(err.contains("--class apply to the dedicated plan only") && err.contains("--plan dedicated"), "{err}");
    let dedicated = Plan::Dedicated(DedicatedPlan { node_class: "M".into(), count: 2 });
    let err = flags(&["--cpu", "2"]).over(Some(&dedicated)).unwrap_err().to_string();
    assert!(err.contains("--cpu apply to the shared plan only"), "{err}");
    assert_eq!(
        flags(&["--count", "3"]).over(Some(&dedicated)).unwrap(),
        Plan::Dedicated(DedicatedPlan { node_class: "M".into(), count: 3 })
    );
    // Moving to shared needs the quota the dedicated plan did not have.
    let err = flags(&["--plan", "shared"]).over(Some(&dedicated)).unwrap_err().to_string();
    assert!(err.contains("needs --cpu"), "{err}");
}

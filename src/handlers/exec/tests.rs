//! The handler against real programs (`/bin/sh` scripts), outside any
//! dispatcher: each waits with a deadline and asserts outcomes only.

use std::time::Duration;

use dispatcher_actors::{TaskId, TaskKind};

use super::*;

const DEADLINE: Duration = Duration::from_secs(10);
const SH: &str = "/bin/sh";

/// Runs `/bin/sh` with `PATH` and what `options.env` adds.
fn exec(mut options: ExecOptions) -> Exec {
    options.allow = vec![SH.to_owned()];
    options
        .env
        .push(("PATH".to_owned(), "/usr/bin:/bin".into()));
    Exec::new(options).unwrap()
}

fn ctx(timeout: Duration) -> (TaskContext, impl Fn()) {
    let (ctx, token) = TaskContext::detached(
        TaskId::new("t").unwrap(),
        TaskKind::new("exec").unwrap(),
        timeout,
    );
    (ctx, move || token.cancel())
}

/// The process group of `pid`.
fn pgrp(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

async fn run_sh(exec: &Exec, script: &str) -> Result<Value, TaskError> {
    let (ctx, _cancel) = ctx(DEADLINE);
    let payload = json!({"program": SH, "args": ["-c", script]});
    tokio::time::timeout(DEADLINE, exec.run(ctx, payload))
        .await
        .expect("the attempt ends within 10 s")
}

/// Pids of live processes whose environment holds `var`.
fn carrying(var: &str) -> Vec<i32> {
    let needle = var.as_bytes();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rfind(')')
                .is_some_and(|i| stat[i + 1..].trim_start().starts_with('Z'));
            !zombie
                && std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == needle))
        })
        .collect()
}

#[tokio::test]
async fn a_result_after_an_invalid_utf8_line_is_kept() {
    let exec = exec(ExecOptions::default());
    let out = run_sh(&exec, r#"printf '\377\376 nope\n{"result": 7}\n'"#).await;
    assert_eq!(out.unwrap(), json!(7));
}

#[tokio::test]
async fn the_attempt_ends_when_the_program_exits_though_a_child_holds_stdout() {
    let mark = format!("EXEC_UNIT_MARK={}", uuid::Uuid::now_v7().simple());
    let (name, value) = mark.split_once('=').unwrap();
    let exec = exec(ExecOptions {
        env: vec![(name.to_owned(), value.into())],
        ..ExecOptions::default()
    });
    let out = run_sh(&exec, r#"sleep 600 & echo "{\"result\": $!}""#).await;
    let child = out.unwrap().as_i64().expect("the child's pid") as i32;
    assert!(!carrying(&mark).contains(&child), "the child was stopped");
    assert_eq!(carrying(&mark), Vec::<i32>::new(), "the child was stopped");
}

#[tokio::test]
async fn the_environment_holds_path_the_allowed_and_the_tag_only() {
    let exec = Exec::new(ExecOptions {
        allow: vec![SH.to_owned()],
        env: vec![
            ("PATH".to_owned(), "/usr/bin:/bin".into()),
            ("ALLOWED".to_owned(), "yes".into()),
        ],
        ..ExecOptions::default()
    })
    .unwrap();
    let script = r#"printf '{"result": "%s"}\n' "$(env | cut -d= -f1 | sort | tr '\n' ' ')""#;
    let names = run_sh(&exec, script).await.unwrap();
    let names: Vec<&str> = names.as_str().unwrap().split_whitespace().collect();
    // The shell adds PWD of its own.
    let expected = ["ALLOWED", "DISPATCH_EXEC_RUN", "PATH", "PWD"];
    assert!(names.iter().all(|n| expected.contains(n)), "{names:?}");
    assert!(names.contains(&"ALLOWED") && names.contains(&"DISPATCH_EXEC_RUN"));
}

#[tokio::test]
async fn a_failure_carries_the_real_end_of_a_long_stderr() {
    let exec = exec(ExecOptions::default());
    let script = "head -c 3000000 /dev/zero | tr '\\0' x >&2; echo 'the real cause' >&2; exit 3";
    let err = run_sh(&exec, script).await.unwrap_err();
    let message = err.message();
    assert!(
        message.ends_with("the real cause"),
        "{}",
        &message[message.len() - 100..]
    );
    assert!(message.len() < STDERR_TAIL + 200, "{}", message.len());
}

#[tokio::test]
async fn output_past_the_limit_is_drained_and_fails_the_attempt() {
    let exec = exec(ExecOptions {
        max_output: 1000,
        ..ExecOptions::default()
    });
    let script = r#"echo '{"progress": 1}'; head -c 100000 /dev/zero; echo '{"result": 1}'"#;
    let err = run_sh(&exec, script).await.unwrap_err();
    assert!(err.message().contains("--exec-max-output"), "{err}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn an_over_long_result_line_fails_rather_than_completing_with_null() {
    let exec = exec(ExecOptions {
        max_line: 100,
        ..ExecOptions::default()
    });
    let long = format!(r#"echo '{{"result": "{}"}}'"#, "x".repeat(200));
    let err = run_sh(&exec, &long).await.unwrap_err();
    assert!(err.message().contains("--exec-max-line"), "{err}");
    // Short lines after a long one still count.
    let ok = format!(r#"{long}; echo '{{"result": 2}}'"#);
    assert_eq!(run_sh(&exec, &ok).await.unwrap(), json!(2));
}

#[tokio::test]
async fn cancel_stops_the_group_and_a_setsid_descendant_ignoring_sigterm() {
    let mark = format!("EXEC_UNIT_MARK={}", uuid::Uuid::now_v7().simple());
    let (name, value) = mark.split_once('=').unwrap();
    let exec = exec(ExecOptions {
        env: vec![(name.to_owned(), value.into())],
        kill_grace: Duration::from_millis(50),
        ..ExecOptions::default()
    });
    let (ctx, cancel) = ctx(DEADLINE);
    let script = "trap '' TERM; sleep 600 & setsid sh -c \"trap '' TERM; sleep 600\" & \
                  echo '{\"progress\": 1}'; wait";
    let payload = json!({"program": SH, "args": ["-c", script]});
    let attempt = tokio::spawn(async move { exec.run(ctx, payload).await });
    // Wait until the run has its processes, then cancel.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let left_group = |pids: &[i32]| {
        let groups: std::collections::BTreeSet<_> = pids.iter().filter_map(|&p| pgrp(p)).collect();
        groups.len() > 1
    };
    while carrying(&mark).len() < 3 || !left_group(&carrying(&mark)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            carrying(&mark)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cancel();
    let out = tokio::time::timeout(DEADLINE, attempt)
        .await
        .expect("the attempt ends within 10 s")
        .unwrap();
    assert!(out.unwrap_err().message().contains("cancelled"));
    assert_eq!(
        carrying(&mark),
        Vec::<i32>::new(),
        "nothing of the run is left"
    );
}

#[test]
fn bad_settings_are_refused() {
    let bad = |options: ExecOptions| Exec::new(options).unwrap_err();
    assert!(matches!(
        bad(ExecOptions {
            allow: vec!["sh".into()],
            ..ExecOptions::default()
        }),
        ExecConfigError::NotAbsolute(_)
    ));
    assert!(matches!(
        bad(ExecOptions {
            allow: vec![SH.into()],
            env: vec![(RUN_VAR.into(), "x".into())],
            ..ExecOptions::default()
        }),
        ExecConfigError::EnvName(_)
    ));
    assert!(matches!(
        bad(ExecOptions {
            allow: vec![SH.into()],
            max_line: 0,
            ..ExecOptions::default()
        }),
        ExecConfigError::ZeroLimit
    ));
}

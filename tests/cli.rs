//! The built binary end to end: `serve` as a child process against a
//! private nats-server, `submit --wait` against it, configuration errors,
//! `--help`, and a graceful stop on SIGTERM.

use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use dispatcher_nats::LocalServer;
use futures::StreamExt;

const BIN: &str = env!("CARGO_BIN_EXE_dispatcher");
const DEADLINE: Duration = Duration::from_secs(20);

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run dispatcher")
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn every_command_explains_itself() {
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["submit", "--help"],
    ] {
        let out = run(&args);
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage"), "{args:?}: {text}");
    }
    let serve = String::from_utf8_lossy(&run(&["serve", "--help"]).stdout).into_owned();
    assert!(serve.contains("DISPATCH_WORKERS"), "{serve}");
}

#[test]
fn bad_worker_counts_are_refused_clearly() {
    for n in ["0", "11"] {
        let out = run(&["serve", "--workers", n, "--nats-url", "nats://127.0.0.1:1"]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("workers must be 1 to 10"), "{err}");
    }
}

#[tokio::test]
async fn serve_runs_submitted_tasks_and_stops_gracefully_on_sigterm() {
    let server = LocalServer::start().unwrap();
    let url = server.url();
    let client = async_nats::connect(&url).await.unwrap();
    let mut nodes = client.subscribe("cli.nodes.*.*").await.unwrap();
    client.flush().await.unwrap();
    let child = Command::new(BIN)
        .args([
            "serve",
            "--nats-url",
            &url,
            "--prefix",
            "cli",
            "--workers",
            "2",
            "--enable-chaos",
            "--node-id",
            "cli-node",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut serve = Serve(child);
    loop {
        let msg = tokio::time::timeout(DEADLINE, nodes.next())
            .await
            .expect("node online")
            .unwrap();
        if msg.subject.as_str() == "cli.nodes.cli-node.online" {
            break;
        }
    }

    let ok = run(&[
        "submit",
        "--nats-url",
        &url,
        "--prefix",
        "cli",
        "sleep",
        r#"{"ms": 10, "steps": 2}"#,
        "--wait",
    ]);
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{text}");
    assert!(
        text.contains("100% step 2 of 2") && text.contains("completed"),
        "{text}"
    );

    let failing = run(&[
        "submit",
        "--nats-url",
        &url,
        "--prefix",
        "cli",
        "chaos",
        r#"{"fail": "on purpose"}"#,
        "--max-attempts",
        "1",
        "--wait",
    ]);
    assert_eq!(failing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&failing.stdout).contains("on purpose"));

    let rejected = run(&[
        "submit",
        "--nats-url",
        &url,
        "--prefix",
        "cli",
        "echo",
        "1",
        "--priority",
        "urgent",
    ]);
    assert_eq!(rejected.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&rejected.stdout).contains("invalid_field"));

    let stats = run(&["stats", "--nats-url", &url, "--prefix", "cli"]);
    assert!(stats.status.success());
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["stats"]["completed"], 1);
    assert_eq!(stats["stats"]["failed"], 1);
    let failed = run(&[
        "list",
        "--nats-url",
        &url,
        "--prefix",
        "cli",
        "--status",
        "failed",
    ]);
    let failed: serde_json::Value = serde_json::from_slice(&failed.stdout).unwrap();
    assert_eq!(failed["tasks"][0]["kind"], "chaos");
    let id = failed["tasks"][0]["id"].as_str().unwrap().to_owned();
    let status = run(&["status", "--nats-url", &url, "--prefix", "cli", &id]);
    assert!(status.status.success());
    let cancel = run(&["cancel", "--nats-url", &url, "--prefix", "cli", &id]);
    assert_eq!(cancel.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&cancel.stdout).contains("already_finished"));

    let term = Command::new("kill")
        .args(["-TERM", &serve.0.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    loop {
        let msg = tokio::time::timeout(DEADLINE, nodes.next())
            .await
            .expect("node offline")
            .unwrap();
        if msg.subject.as_str() == "cli.nodes.cli-node.offline" {
            break;
        }
    }
    let deadline = std::time::Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = serve.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "serve did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
}

//! The built binary end to end: `serve` as a child process against a
//! private nats-server, `submit --wait` and `watch` against it,
//! configuration errors (flags and file), `--help`, `demo`, and a graceful
//! stop on SIGTERM.

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
    for command in [
        "serve", "submit", "status", "cancel", "list", "stats", "errors", "watch", "demo",
    ] {
        let out = run(&[command, "--help"]);
        assert!(out.status.success(), "{command}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Usage") && text.contains("--nats-url") && text.contains("--config"),
            "{command}: {text}"
        );
    }
    for args in [vec!["--help"], vec!["help", "serve"]] {
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
        assert_eq!(
            err.matches("invalid configuration").count(),
            1,
            "said once: {err}"
        );
    }
}

#[test]
fn connection_flags_go_before_or_after_a_subcommand() {
    // Nothing listens on port 1: parsing passes, connecting fails.
    for args in [
        [
            "dead",
            "list",
            "--prefix",
            "acme",
            "--nats-url",
            "nats://127.0.0.1:1",
        ],
        [
            "dead",
            "--prefix",
            "acme",
            "--nats-url",
            "nats://127.0.0.1:1",
            "list",
        ],
    ] {
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("unexpected argument"), "{args:?}: {err}");
        assert!(!out.status.success(), "{args:?}: no server there");
    }
}

#[test]
fn a_configuration_file_is_read_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let bad_value = dir.path().join("bad.toml");
    std::fs::write(
        &bad_value,
        "workers = 0\nnats-url = \"nats://127.0.0.1:1\"\n",
    )
    .unwrap();
    let out = run(&["serve", "--config", bad_value.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("workers must be 1 to 10"), "{err}");
    // A flag beats the file: with a valid count the error is the connection.
    let out = run(&[
        "serve",
        "--config",
        bad_value.to_str().unwrap(),
        "--workers",
        "2",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("connecting to NATS at nats://127.0.0.1:1"),
        "{err}"
    );

    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "wokers = 4\n").unwrap();
    let out = run(&["serve", "--config", typo.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wokers"), "{err}");
}

#[test]
fn the_demo_runs_its_batch_to_the_planned_ends() {
    // No server answers on port 1, so the demo starts a private one.
    let out = Command::new(BIN)
        .args(["demo", "--nats-url", "nats://127.0.0.1:1", "--plain"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("started a private nats-server"), "{stderr}");
    for status in ["completed", "failed", "timed_out", "cancelled"] {
        assert!(stdout.contains(status), "{status} missing:\n{stdout}");
    }
    assert!(stdout.contains("worker_crashed"), "{stdout}");
    assert!(!stdout.contains("NOT AS PLANNED"), "{stdout}");
    assert!(stdout.contains("24 submitted, 21 completed"), "{stdout}");
}

/// Starts `serve` and waits for its `online` event.
async fn serve(url: &str, prefix: &str, node: &str) -> Serve {
    let client = async_nats::connect(url).await.unwrap();
    let mut online = client
        .subscribe(format!("{prefix}.nodes.{node}.online"))
        .await
        .unwrap();
    client.flush().await.unwrap();
    let child = Command::new(BIN)
        .args([
            "serve",
            "--nats-url",
            url,
            "--prefix",
            prefix,
            "--workers",
            "2",
            "--enable-chaos",
            "--node-id",
            node,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let serve = Serve(child);
    tokio::time::timeout(DEADLINE, online.next())
        .await
        .expect("node online within 20 s");
    serve
}

/// Starts `watch` and waits until it says it is subscribed.
fn watch(url: &str, prefix: &str, extra: &[&str]) -> Serve {
    use std::io::BufRead as _;
    let mut child = Command::new(BIN)
        .args(["watch", "--nats-url", url, "--prefix", prefix])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufReader::new(stderr).lines();
    let first = lines.next().expect("watch prints").unwrap();
    assert!(first.starts_with("Watching"), "{first}");
    Serve(child)
}

/// Waits for a child to exit, within the deadline, and returns its stdout.
async fn finish(mut child: Serve) -> (std::process::ExitStatus, String) {
    use std::io::Read as _;
    let deadline = std::time::Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the child did not exit within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut out = String::new();
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    (status, out)
}

#[tokio::test]
async fn watch_follows_tasks_to_their_end() {
    let server = LocalServer::start().unwrap();
    let url = server.url();
    let _node = serve(&url, "w", "watch-node").await;
    let plain = watch(&url, "w", &["--count", "2"]);
    let json = watch(&url, "w", &["--count", "2", "--json", "--kind", "chaos"]);
    let ok = run(&[
        "submit",
        "--nats-url",
        &url,
        "--prefix",
        "w",
        "chaos",
        r#"{"fail_times": 1}"#,
        "--id",
        "watched-1",
        "--wait",
    ]);
    assert!(ok.status.success());
    let failed = run(&[
        "submit",
        "--nats-url",
        &url,
        "--prefix",
        "w",
        "chaos",
        r#"{"fail": "boom"}"#,
        "--id",
        "watched-2",
        "--max-attempts",
        "1",
    ]);
    assert!(failed.status.success());

    let (status, out) = finish(plain).await;
    assert!(status.success());
    assert!(
        out.contains("watched-1") && out.contains("completed (attempt 2)"),
        "{out}"
    );
    assert!(out.contains("watched-2") && out.contains("boom"), "{out}");
    assert!(out.contains("retry in"), "{out}");

    let (status, out) = finish(json).await;
    assert!(status.success());
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect();
    let names: Vec<&str> = events
        .iter()
        .filter(|e| e["task_id"] == "watched-1")
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["accepted", "started", "retrying", "started", "completed"],
        "{out}"
    );
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

/// Starts `serve` with extra flags, and waits for its `online` event.
async fn serve_with(url: &str, prefix: &str, node: &str, extra: &[&str]) -> Serve {
    let client = async_nats::connect(url).await.unwrap();
    let mut online = client
        .subscribe(format!("{prefix}.nodes.{node}.online"))
        .await
        .unwrap();
    client.flush().await.unwrap();
    let child = Command::new(BIN)
        .args([
            "serve",
            "--nats-url",
            url,
            "--prefix",
            prefix,
            "--node-id",
            node,
        ])
        .args(["--enable-chaos"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let serve = Serve(child);
    tokio::time::timeout(DEADLINE, online.next())
        .await
        .expect("node online within 20 s");
    serve
}

#[tokio::test]
async fn a_killed_nodes_tasks_are_taken_over_long_before_ack_wait() {
    let server = LocalServer::start().unwrap();
    let url = server.url();
    let fast = [
        "--heartbeat-interval",
        "200ms",
        "--ack-wait",
        "60s",
        "--workers",
        "1",
        "--queue-capacity",
        "2",
    ];
    let mut doomed = serve_with(&url, "rc", "doomed", &fast).await;
    let client = async_nats::connect(&url).await.unwrap();
    let mut started = client.subscribe("rc.events.*.*.started").await.unwrap();
    client.flush().await.unwrap();
    for i in 0..3 {
        let out = run(&[
            "submit",
            "--nats-url",
            &url,
            "--prefix",
            "rc",
            "chaos",
            r#"{"sleep_ms": 120000}"#,
            "--id",
            &format!("long-{i}"),
        ]);
        assert!(out.status.success());
    }
    let first: serde_json::Value = serde_json::from_slice(
        &tokio::time::timeout(DEADLINE, started.next())
            .await
            .unwrap()
            .unwrap()
            .payload,
    )
    .unwrap();
    assert_eq!(first["node"], "doomed");

    // A second node, which must have seen the first one's heartbeats.
    let _heir = serve_with(
        &url,
        "rc",
        "heir",
        &["--heartbeat-interval", "200ms", "--workers", "3"],
    )
    .await;
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let out = run(&["nodes", "--nats-url", &url, "--prefix", "rc"]);
        let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let names: Vec<&str> = nodes["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["node"].as_str().unwrap())
            .collect();
        if names.contains(&"doomed") && names.contains(&"heir") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "nodes: {nodes}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    doomed.0.kill().unwrap();
    let killed_at = std::time::Instant::now();
    let mut taken = std::collections::BTreeSet::new();
    while taken.len() < 3 {
        let msg = tokio::time::timeout(DEADLINE, started.next())
            .await
            .expect(
                "the heir starts the dead node's tasks within 20 s, not after the 60 s ack wait",
            )
            .unwrap();
        let e: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
        if e["node"] == "heir" {
            // An attempt is a run: the one the dead node ran counts, so it
            // goes on at attempt 2; the two it held unstarted start at 1.
            let expected = if e["task_id"] == first["task_id"] {
                2
            } else {
                1
            };
            assert_eq!(e["attempt"], expected, "{e}");
            taken.insert(e["task_id"].as_str().unwrap().to_owned());
        }
    }
    eprintln!(
        "the killed node's 3 tasks started on another node {:?} after the kill",
        killed_at.elapsed()
    );
}

#[tokio::test]
async fn dead_letters_are_listed_and_replayed() {
    let server = LocalServer::start().unwrap();
    let url = server.url();
    let _node = serve_with(&url, "dl", "dl-node", &[]).await;
    let failed = run(&[
        "submit",
        "--nats-url",
        &url,
        "--prefix",
        "dl",
        "chaos",
        r#"{"fail": "bad input"}"#,
        "--id",
        "dead-1",
        "--max-attempts",
        "1",
        "--wait",
    ]);
    assert_eq!(failed.status.code(), Some(1));

    let deadline = std::time::Instant::now() + DEADLINE;
    let letters = loop {
        let out = run(&["dead", "--nats-url", &url, "--prefix", "dl", "list"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if !list["dead"].as_array().unwrap().is_empty() {
            break list;
        }
        assert!(std::time::Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let letter = &letters["dead"][0];
    assert_eq!(letter["id"], "dead-1");
    assert_eq!(letter["attempts"], 1);
    assert_eq!(letter["error"]["message"], "bad input");

    let client = async_nats::connect(&url).await.unwrap();
    let mut events = client.subscribe("dl.events.*.dead-1.*").await.unwrap();
    client.flush().await.unwrap();
    let replay = run(&[
        "dead",
        "--nats-url",
        &url,
        "--prefix",
        "dl",
        "replay",
        "dead-1",
    ]);
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stdout)
    );
    // It runs again, from attempt 1 (and fails again: the input is still bad).
    let mut names = Vec::new();
    while !names.contains(&"failed".to_owned()) {
        let msg = tokio::time::timeout(DEADLINE, events.next())
            .await
            .unwrap()
            .unwrap();
        let e: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
        names.push(e["event"].as_str().unwrap().to_owned());
        if e["event"] == "started" {
            assert_eq!(e["attempt"], 1);
        }
    }
    assert_eq!(names, ["accepted", "started", "failed"]);
    let missing = run(&[
        "dead",
        "--nats-url",
        &url,
        "--prefix",
        "dl",
        "replay",
        "nope",
    ]);
    assert_eq!(missing.status.code(), Some(2));
}

/// A free loopback port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn credentials_flags_reach_the_server() {
    let port = free_port();
    let binary = ["nats-server", "/usr/sbin/nats-server"]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok())
        .expect("nats-server installed (scripts/test installs it)");
    let child = Command::new(binary)
        .args([
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--user",
            "ops",
            "--pass",
            "s3cret",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _server = Serve(child);
    let url = format!("nats://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + DEADLINE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "nats-server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let stats = |extra: &[&str]| {
        let out = Command::new(BIN)
            .args(["stats", "--nats-url", &url, "--max-reconnects", "1"])
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Wrong password: refused by the server.
    let err = stats(&["--nats-user", "ops", "--nats-password", "wrong"]);
    assert!(err.contains("connecting to NATS"), "{err}");
    // Right password: connected; only no node answers.
    let err = stats(&["--nats-user", "ops", "--nats-password", "s3cret"]);
    assert!(err.contains("no dispatcher node answers"), "{err}");
    // A user without a password is refused by the command line itself.
    let err = stats(&["--nats-user", "ops"]);
    assert!(err.contains("--nats-password"), "{err}");
}

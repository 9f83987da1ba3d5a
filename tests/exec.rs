//! The `exec` handler seen from outside: the built binary's `serve` against
//! a private nats-server, running the programs in `tests/fixtures/exec/`.
//! Cancel and timeout leave no process of the run alive (not even one
//! that ignores SIGTERM and left the group with `setsid`); programs see
//! none of the node's `DISPATCH_*` settings, only `PATH` and what
//! `--exec-env` names; a flood of stdout without a newline keeps the
//! node's memory bounded; the attempt ends when the program exits, though
//! a child holds its stdout; a line that is not UTF-8 loses no later line;
//! a failure carries the end of stderr; and bad `--exec-allow` entries stop
//! `serve` at start. Every wait has a deadline; nothing asserts timings.
//!
//! Processes of a run are told apart by a variable that the node passes on
//! with `--exec-env`, with a value unique to each test.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dispatcher_nats::LocalServer;
use futures::StreamExt;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_dispatcher");
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/exec");
const DEADLINE: Duration = Duration::from_secs(10);
/// The variable that marks a test's processes.
const MARK: &str = "EXEC_TEST_MARK";
/// A secret the node has in its environment; no program may see it.
const PASSWORD: &str = "never-show-this-to-a-program";

fn fixture(name: &str) -> String {
    format!("{FIXTURES}/{name}")
}

/// A `serve` process, killed on drop.
struct Serve {
    child: Child,
    /// `EXEC_TEST_MARK=<unique>`, as it appears in a program's environment.
    mark: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    /// Starts `serve` with every fixture allowed, `MARK` passed on, a
    /// password in its environment, and waits for its `online` event.
    async fn start(server: &LocalServer, prefix: &str) -> Self {
        let mark_value = format!("{prefix}-{}", uuid::Uuid::now_v7().simple());
        let client = async_nats::connect(server.url()).await.unwrap();
        let node = format!("{prefix}-node");
        let mut online = client
            .subscribe(format!("{prefix}.nodes.{node}.online"))
            .await
            .unwrap();
        client.flush().await.unwrap();
        let allow = [
            "descendants.py",
            "environment.py",
            "flood.sh",
            "background.sh",
            "bad_utf8.sh",
            "long_stderr.sh",
        ]
        .map(fixture)
        .join(",");
        let child = Command::new(BIN)
            .args(["serve", "--nats-url", &server.url(), "--prefix", prefix])
            .args(["--node-id", &node, "--workers", "2"])
            .args(["--cancel-grace", "400ms", "--exec-allow", &allow])
            .args(["--exec-env", MARK])
            .env(MARK, &mark_value)
            // The node's credentials: the server has no auth, so they are
            // accepted and unused; they must not reach a program.
            .env("DISPATCH_NATS_USER", "exec-test")
            .env("DISPATCH_NATS_PASSWORD", PASSWORD)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let serve = Serve {
            child,
            mark: format!("{MARK}={mark_value}"),
        };
        tokio::time::timeout(DEADLINE, online.next())
            .await
            .expect("the node is online within 10 s");
        serve
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Live processes carrying this node's mark, but the node itself.
    fn marked(&self) -> Vec<i32> {
        let own = self.pid() as i32;
        marked(&self.mark)
            .into_iter()
            .filter(|&p| p != own)
            .collect()
    }
}

/// Pids of live (not zombie) processes whose environment holds `var`.
fn marked(var: &str) -> Vec<i32> {
    let needle = var.as_bytes();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
                && std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == needle))
        })
        .collect()
}

/// `(state, session)` of a process.
fn stat(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    let session = fields.nth(2)?.parse().ok()?;
    Some((state, session))
}

/// Polls `check` until it holds, for at most [`DEADLINE`].
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "not within 10 s: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Submits a task and returns its events until the final one.
async fn run_task(client: &async_nats::Client, prefix: &str, task: Value) -> Vec<Value> {
    let id = task["id"].as_str().unwrap().to_owned();
    let mut events = client
        .subscribe(format!("{prefix}.events.exec.{id}.*"))
        .await
        .unwrap();
    client.flush().await.unwrap();
    submit(client, prefix, task).await;
    until_final(&mut events).await
}

async fn submit(client: &async_nats::Client, prefix: &str, task: Value) {
    let reply = tokio::time::timeout(
        DEADLINE,
        client.request(format!("{prefix}.submit.exec"), task.to_string().into()),
    )
    .await
    .expect("a reply within 10 s")
    .unwrap();
    let reply: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
}

async fn until_final(events: &mut async_nats::Subscriber) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let msg = tokio::time::timeout(DEADLINE, events.next())
            .await
            .expect("an event within 10 s")
            .unwrap();
        let event: Value = serde_json::from_slice(&msg.payload).unwrap();
        let done = matches!(
            event["event"].as_str(),
            Some("completed" | "failed" | "timed_out" | "cancelled")
        );
        seen.push(event);
        if done {
            return seen;
        }
    }
}

/// Starts `descendants.py` as task `id`, waits until its child and its
/// `setsid` grandchild run (all three ignoring SIGTERM), and returns the
/// event subscription.
async fn start_descendants(
    node: &Serve,
    client: &async_nats::Client,
    prefix: &str,
    task: Value,
    dir: &Path,
) -> async_nats::Subscriber {
    let id = task["id"].as_str().unwrap();
    let mut events = client
        .subscribe(format!("{prefix}.events.exec.{id}.*"))
        .await
        .unwrap();
    client.flush().await.unwrap();
    submit(client, prefix, task.clone()).await;
    let ready = dir.join("ready");
    eventually("the descendants started", || ready.exists()).await;
    let pids = node.marked();
    assert!(pids.len() >= 3, "program, child and grandchild: {pids:?}");
    let sessions: std::collections::BTreeSet<i32> =
        pids.iter().filter_map(|&p| Some(stat(p)?.1)).collect();
    assert!(
        sessions.len() >= 2,
        "the grandchild left the session: {pids:?}"
    );
    let first = tokio::time::timeout(DEADLINE, events.next())
        .await
        .unwrap()
        .unwrap();
    let first: Value = serde_json::from_slice(&first.payload).unwrap();
    assert_eq!(first["event"], "accepted");
    events
}

#[tokio::test]
async fn cancel_and_timeout_leave_no_process_of_the_run_alive() {
    let server = LocalServer::start().unwrap();
    let node = Serve::start(&server, "xk").await;
    let client = async_nats::connect(server.url()).await.unwrap();

    // Cancel.
    let dir = tempfile::tempdir().unwrap();
    let task = json!({"id": "kill-me", "max_attempts": 1, "payload": {
        "program": fixture("descendants.py"),
        "input": {"dir": dir.path()},
    }});
    let mut events = start_descendants(&node, &client, "xk", task, dir.path()).await;
    let reply = tokio::time::timeout(
        DEADLINE,
        client.request("xk.api.cancel", r#"{"id": "kill-me"}"#.into()),
    )
    .await
    .unwrap()
    .unwrap();
    let reply: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    let seen = until_final(&mut events).await;
    assert_eq!(seen.last().unwrap()["event"], "cancelled", "{seen:?}");
    eventually("no process of the cancelled run is alive", || {
        node.marked().is_empty()
    })
    .await;

    // Timeout.
    let dir = tempfile::tempdir().unwrap();
    let task = json!({"id": "time-me-out", "max_attempts": 1, "timeout_ms": 3000, "payload": {
        "program": fixture("descendants.py"),
        "input": {"dir": dir.path()},
    }});
    let mut events = start_descendants(&node, &client, "xk", task, dir.path()).await;
    let seen = until_final(&mut events).await;
    assert_eq!(seen.last().unwrap()["event"], "timed_out", "{seen:?}");
    eventually("no process of the timed-out run is alive", || {
        node.marked().is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_program_sees_no_dispatch_setting_only_path_and_what_exec_env_names() {
    let server = LocalServer::start().unwrap();
    let node = Serve::start(&server, "xe").await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let seen = run_task(
        &client,
        "xe",
        json!({"id": "env", "payload": {"program": fixture("environment.py")}}),
    )
    .await;
    let last = seen.last().unwrap();
    assert_eq!(last["event"], "completed", "{last}");
    let env = last["result"].as_object().unwrap();
    let text = serde_json::to_string(env).unwrap();
    assert!(!text.contains(PASSWORD), "the password leaked: {text}");
    let dispatch: Vec<&String> = env.keys().filter(|k| k.starts_with("DISPATCH_")).collect();
    assert_eq!(dispatch, ["DISPATCH_EXEC_RUN"], "{text}");
    assert!(env.contains_key("PATH"), "{text}");
    let (_, mark_value) = node.mark.split_once('=').unwrap();
    assert_eq!(env[MARK], mark_value, "{text}");
    // Nothing else of the test's own environment came along.
    assert!(!env.contains_key("CARGO_MANIFEST_DIR"), "{text}");
}

/// The resident set of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kb * 1024
}

#[tokio::test]
async fn a_flood_of_stdout_without_newline_keeps_the_node_small_and_ends_cleanly() {
    const LIMIT: u64 = 200 << 20;
    let server = LocalServer::start().unwrap();
    let node = Serve::start(&server, "xf").await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let pid = node.pid();
    let run = run_task(
        &client,
        "xf",
        json!({"id": "flood", "max_attempts": 1, "timeout_ms": 60000,
               "payload": {"program": fixture("flood.sh")}}),
    );
    tokio::pin!(run);
    let mut peak = rss(pid);
    let seen = loop {
        tokio::select! {
            seen = &mut run => break seen,
            _ = tokio::time::sleep(Duration::from_millis(5)) => peak = peak.max(rss(pid)),
        }
    };
    peak = peak.max(rss(pid));
    assert!(peak < LIMIT, "the node grew to {} MB", peak >> 20);
    let last = seen.last().unwrap();
    assert_eq!(last["event"], "failed", "{last}");
    let message = last["error"]["message"].as_str().unwrap();
    assert!(message.contains("--exec-max-output"), "{message}");
    // The node is alive and serves on.
    assert!(rss(pid) < LIMIT);
    let seen = run_task(
        &client,
        "xf",
        json!({"id": "after-flood", "payload": {"program": fixture("bad_utf8.sh")}}),
    )
    .await;
    assert_eq!(seen.last().unwrap()["event"], "completed");
}

#[tokio::test]
async fn the_task_ends_when_the_program_exits_though_a_child_holds_stdout() {
    let server = LocalServer::start().unwrap();
    let node = Serve::start(&server, "xb").await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let seen = run_task(
        &client,
        "xb",
        json!({"id": "bg", "max_attempts": 1, "timeout_ms": 5000,
               "payload": {"program": fixture("background.sh")}}),
    )
    .await;
    let last = seen.last().unwrap();
    assert_eq!(last["event"], "completed", "{seen:?}");
    let child = last["result"].as_i64().expect("the child's pid") as i32;
    assert!(child > 0);
    eventually("the background child is stopped", || {
        !node.marked().contains(&child)
    })
    .await;
}

#[tokio::test]
async fn a_line_that_is_not_utf8_loses_no_later_line() {
    let server = LocalServer::start().unwrap();
    let _node = Serve::start(&server, "xu").await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let seen = run_task(
        &client,
        "xu",
        json!({"id": "utf8", "payload": {"program": fixture("bad_utf8.sh")}}),
    )
    .await;
    let last = seen.last().unwrap();
    assert_eq!(last["event"], "completed", "{last}");
    assert_eq!(last["result"], "kept");
}

#[tokio::test]
async fn a_failure_carries_the_end_of_a_long_stderr() {
    let server = LocalServer::start().unwrap();
    let _node = Serve::start(&server, "xs").await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let seen = run_task(
        &client,
        "xs",
        json!({"id": "stderr", "max_attempts": 1,
               "payload": {"program": fixture("long_stderr.sh")}}),
    )
    .await;
    let last = seen.last().unwrap();
    assert_eq!(last["event"], "failed", "{last}");
    let message = last["error"]["message"].as_str().unwrap();
    assert!(
        message.ends_with("the real cause is at the end"),
        "{}",
        &message[message.len().saturating_sub(200)..]
    );
    assert!(message.len() < 8192, "{} bytes", message.len());
}

#[test]
fn serve_refuses_exec_allow_entries_that_are_not_absolute_existing_executables() {
    let dir = tempfile::tempdir().unwrap();
    let not_executable = dir.path().join("data.txt");
    std::fs::write(&not_executable, "x").unwrap();
    let missing = dir.path().join("missing");
    let cases = [
        ("echo", "not an absolute path"),
        ("./prog", "not an absolute path"),
        ("", "empty"),
        (missing.to_str().unwrap(), "no such file"),
        (not_executable.to_str().unwrap(), "not executable"),
        (dir.path().to_str().unwrap(), "not a regular file"),
    ];
    for (entry, why) in cases {
        let out = Command::new(BIN)
            // Port 1: the check comes before any connection.
            .args(["serve", "--nats-url", "nats://127.0.0.1:1"])
            .arg(format!("--exec-allow={entry}"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{entry:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{entry:?}: {err}");
        if !entry.is_empty() {
            assert!(
                err.contains(&format!("{entry:?}")),
                "names {entry:?}: {err}"
            );
        }
        assert!(!err.contains("connecting to NATS"), "{err}");
    }
}

//! Logging in, end to end: the built binary against private nats-servers
//! that require a user and password or a token. Credentials in
//! `--nats-url` log in, a wrong one fails without being printed (debug
//! logs included), conflicting or broken login settings are refused
//! before connecting, and a second node with a live node's id refuses to
//! start.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use dispatcher_nats::LocalServer;
use futures::StreamExt;

const BIN: &str = env!("CARGO_BIN_EXE_dispatcher");
const DEADLINE: Duration = Duration::from_secs(20);

const USER: &str = "ops";
/// Characters that must be percent-encoded in a URL stay out of it, so
/// that the URL can be written as is.
const PASSWORD: &str = "pw-Xq7s3cret";
const TOKEN: &str = "tok-Zk9s3cret";

/// A child process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Waits for it to exit within the deadline; kills it and fails if it
    /// does not.
    async fn exit(&mut self, what: &str) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "{what} did not exit within 20 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn running(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}

/// `nats://127.0.0.1:<port>` with `login@` in it.
fn url_with(server: &LocalServer, login: &str) -> String {
    format!("nats://{login}@127.0.0.1:{}", server.port())
}

/// A server that requires the user and password.
fn server_with_password() -> LocalServer {
    LocalServer::start_with(&["--user", USER, "--pass", PASSWORD]).expect("nats-server")
}

/// Runs a client command to its end (they all end within their reply
/// timeout); returns status, stdout and stderr.
fn run(args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts `serve` with debug logs into `log`.
fn spawn_serve(url: &str, prefix: &str, node: &str, log: &Path) -> Proc {
    let out = std::fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    let child = Command::new(BIN)
        .args(["serve", "--nats-url", url, "--prefix", prefix])
        .args(["--node-id", node, "--workers", "2"])
        .env("DISPATCH_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap();
    Proc(child)
}

/// Starts `serve` and waits for its `online` event, seen through `client`.
async fn serve_online(
    client: &async_nats::Client,
    url: &str,
    prefix: &str,
    node: &str,
    log: &Path,
) -> Proc {
    let mut online = client
        .subscribe(format!("{prefix}.nodes.{node}.online"))
        .await
        .unwrap();
    client.flush().await.unwrap();
    let mut serve = spawn_serve(url, prefix, node, log);
    let seen = tokio::time::timeout(DEADLINE, online.next()).await;
    if seen.is_err() {
        let running = serve.running();
        let log = std::fs::read_to_string(log).unwrap_or_default();
        panic!("{node} not online within 20 s (running: {running}); its log:\n{log}");
    }
    serve
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

#[tokio::test]
async fn a_user_and_password_in_the_url_log_in_and_never_show() {
    let server = server_with_password();
    let url = url_with(&server, &format!("{USER}:{PASSWORD}"));
    let client = async_nats::ConnectOptions::with_user_and_password(USER.into(), PASSWORD.into())
        .connect(server.url())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    let _serve = serve_online(&client, &url, "cu", "cu-node", &log).await;

    let (status, stdout, stderr) = run(&[
        "submit",
        "--nats-url",
        &url,
        "--prefix",
        "cu",
        "echo",
        r#"{"n": 7}"#,
        "--wait",
    ]);
    assert!(status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("completed"), "{stdout}");
    let (status, stdout, stderr) = run(&["stats", "--nats-url", &url, "--prefix", "cu"]);
    assert!(status.success(), "{stdout}\n{stderr}");

    // Not in the node's log either, debug lines of async-nats included.
    let log = log_of(&log);
    assert!(log.contains("Node online"), "{log}");
    assert!(!log.contains(PASSWORD), "{log}");
}

#[tokio::test]
async fn a_wrong_password_fails_and_is_not_printed() {
    let server = server_with_password();
    let wrong = "Wr0ng-s3cret";
    let url = url_with(&server, &format!("{USER}:{wrong}"));
    let (status, _, stderr) = run(&["stats", "--nats-url", &url, "--max-reconnects", "1"]);
    assert!(!status.success());
    let bare = format!("nats://127.0.0.1:{}", server.port());
    assert!(
        stderr.contains(&format!("connecting to NATS at {bare}")),
        "{stderr}"
    );
    assert!(!stderr.contains(wrong), "{stderr}");

    // A node with debug logs: it stops at once, and says nothing of it.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    let mut serve = spawn_serve(&url, "cw", "cw-node", &log);
    let status = serve.exit("serve with a wrong password").await;
    assert!(!status.success());
    let log = log_of(&log);
    assert!(log.contains("connecting to NATS at"), "{log}");
    assert!(!log.contains(wrong), "{log}");
}

#[tokio::test]
async fn a_token_in_the_url_logs_in() {
    let server = LocalServer::start_with(&["--auth", TOKEN]).expect("nats-server");
    let url = url_with(&server, TOKEN);
    let client = async_nats::ConnectOptions::with_token(TOKEN.into())
        .connect(server.url())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    let _serve = serve_online(&client, &url, "ct", "ct-node", &log).await;
    let (status, stdout, stderr) = run(&["stats", "--nats-url", &url, "--prefix", "ct"]);
    assert!(status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("ct-node"), "{stdout}");
    assert!(!log_of(&log).contains(TOKEN));
    // Without it, the server refuses.
    let bare = format!("nats://127.0.0.1:{}", server.port());
    let (status, _, stderr) = run(&["stats", "--nats-url", &bare, "--max-reconnects", "1"]);
    assert!(!status.success(), "{stderr}");
}

#[test]
fn broken_or_conflicting_login_settings_are_refused_before_connecting() {
    // Nothing listens on port 1: each error comes from the checks.
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, "SUnot-a-seed-but-secret\n").unwrap();
    let garbage = garbage.to_str().unwrap();
    let url = format!("nats://{USER}:{PASSWORD}@127.0.0.1:1");
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--nats-url", &url, "--nats-token", "t"],
            vec![
                "conflicting NATS credentials",
                "--nats-token",
                "in --nats-url",
            ],
        ),
        (
            vec![
                "--nats-token",
                "t",
                "--nats-user",
                "u",
                "--nats-password",
                "p",
            ],
            vec![
                "conflicting NATS credentials",
                "--nats-token",
                "--nats-user",
            ],
        ),
        (
            vec!["--nats-url", "nats://127.0.0.1:1", "--nats-nkey", garbage],
            vec![garbage, "starting with `SU`"],
        ),
        (
            vec!["--nats-url", "nats://127.0.0.1:1", "--nats-creds", garbage],
            vec![garbage, "credentials file"],
        ),
        (
            vec!["--nats-url", "nats://127.0.0.1:1", "--tls-ca", garbage],
            vec![garbage, "no PEM certificate"],
        ),
    ];
    for (args, expected) in cases {
        for command in ["stats", "serve"] {
            let mut all = vec![command];
            all.extend(&args);
            let (status, _, stderr) = run(&all);
            assert_eq!(status.code(), Some(2), "{all:?}: {stderr}");
            for text in &expected {
                assert!(stderr.contains(text), "{all:?}: {text} missing in {stderr}");
            }
            assert!(!stderr.contains("connecting to NATS"), "{all:?}: {stderr}");
            assert!(!stderr.contains(PASSWORD), "{all:?}: {stderr}");
            assert!(
                !stderr.contains("not-a-seed-but-secret"),
                "{all:?}: {stderr}"
            );
        }
    }
}

#[tokio::test]
async fn a_second_node_with_a_live_nodes_id_refuses_to_start() {
    let server = LocalServer::start().unwrap();
    let url = server.url();
    let client = async_nats::connect(&url).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut first = serve_online(&client, &url, "cd", "twin", &dir.path().join("1.log")).await;

    let second_log = dir.path().join("2.log");
    let mut second = spawn_serve(&url, "cd", "twin", &second_log);
    let status = second.exit("the second node").await;
    let log = log_of(&second_log);
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("another live node already runs with id `twin`"),
        "{log}"
    );
    assert!(!log.contains("Node online"), "{log}");

    // The first goes on, alone, and says it was asked.
    assert!(first.running());
    let (status, stdout, stderr) = run(&["stats", "--nats-url", &url, "--prefix", "cd"]);
    assert!(status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("\"node\": \"twin\""), "{stdout}");
    let log = log_of(&dir.path().join("1.log"));
    assert!(log.contains("Another process asked to start"), "{log}");

    // Killed outright, it leaves the id free: a restart takes it at once.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let _third = serve_online(&client, &url, "cd", "twin", &dir.path().join("3.log")).await;
}

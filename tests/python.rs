//! Runs the Python client (`tests/python/client_test.py`, nats-py) against a
//! node: any language can use the dispatcher with plain NATS.
//! `scripts/test` installs nats-py into `target/pyenv` and points
//! `DISPATCH_PYTHON` at that interpreter. The checks run Python with `-I`:
//! otherwise the `nats/` crate folder passes for the `nats` package.

use std::process::Command;

use dispatcher::handlers::{builtin_handlers, HandlerOptions};
use dispatcher_actors::{DispatcherConfig, NodeId};
use dispatcher_nats::{LocalServer, Node, NodeOptions};

#[actix::test]
async fn a_python_client_submits_watches_and_reads_status() {
    let python = std::env::var("DISPATCH_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let has_nats = Command::new(&python)
        .args(["-I", "-c", "import nats.aio.client"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_nats,
        "{python} cannot import nats: run scripts/test, which installs nats-py"
    );

    let server = LocalServer::start().unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let options = NodeOptions {
        prefix: "py".to_owned(),
        ..NodeOptions::default()
    };
    let config = DispatcherConfig::new(NodeId::new("py-node").unwrap());
    let node = Node::start(
        client,
        config,
        builtin_handlers(&HandlerOptions::default()).unwrap(),
        options,
    )
    .await
    .unwrap();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/client_test.py");
    let url = server.url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python).args([script, &url, "py"]).output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("status ok: completed"), "{stdout}");

    // The README's example script, as a user would run it.
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/python/publish_and_watch.py"
    );
    let python = std::env::var("DISPATCH_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let url = server.url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .args(["-I", example, &url, "py"])
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "example failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("100% step 5 of 5"), "{stdout}");
    assert!(
        stdout.contains("record: completed after 1 attempt(s)"),
        "{stdout}"
    );
    node.shutdown().await;
}

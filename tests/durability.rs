//! Durability end to end, with real processes: `dispatcher serve` nodes run
//! as child processes against private nats-servers. A node killed with
//! SIGKILL mid-run loses no task (what it held comes back to the others);
//! a nats-server restart loses nothing that was accepted; nodes on the
//! three servers of a JetStream cluster share one queue.
//!
//! Figures (tasks lost, tasks run twice, how long after the kill the
//! killed node's tasks started again elsewhere) are printed and written to
//! `target/durability-report.txt`; they are measured, never asserted. Every
//! wait has a deadline; nothing sleeps to wait. Node logs go to
//! `target/tmp/durability-<prefix>-<node>.log`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::future::IntoFuture as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::HeaderMap;
use dispatcher_nats::LocalServer;
use futures::StreamExt;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_dispatcher");
/// Deadline of one request, one start-up, one event.
const DEADLINE: Duration = Duration::from_secs(20);
/// The events that end a task.
const FINAL: [&str; 4] = ["completed", "failed", "timed_out", "cancelled"];

// ---------------------------------------------------------------------------
// Processes

/// A `dispatcher serve` child process, killed on drop; its stdout and
/// stderr go to a log file under `target/tmp`.
struct Serve {
    child: Child,
    id: String,
    log: PathBuf,
}

impl Serve {
    /// Starts `serve --mode jetstream` with `extra` flags.
    fn spawn(url: &str, prefix: &str, id: &str, extra: &[&str]) -> Self {
        let log =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("durability-{prefix}-{id}.log"));
        let out = std::fs::File::create(&log).expect("node log file");
        let err = out.try_clone().expect("node log file");
        let child = Command::new(BIN)
            .args(["serve", "--mode", "jetstream", "--nats-url", url])
            .args(["--prefix", prefix, "--node-id", id])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start dispatcher serve");
        Self {
            child,
            id: id.to_owned(),
            log,
        }
    }

    /// SIGKILL, and reap.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process has exited.
    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// The last lines of its log, for failure messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(30);
        format!(
            "--- {} ({}) ---\n{}",
            self.id,
            self.log.display(),
            lines[from..].join("\n")
        )
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts the node and waits for its `online` event, seen by a client on
/// the node's own server; a node that exits first (JetStream not ready yet
/// in a young cluster) is started again, all within `within`.
async fn start_online(
    client: &async_nats::Client,
    url: &str,
    prefix: &str,
    id: &str,
    extra: &[&str],
    within: Duration,
) -> Serve {
    let deadline = Instant::now() + within;
    let mut online = client
        .subscribe(format!("{prefix}.nodes.{id}.online"))
        .await
        .unwrap();
    client.flush().await.unwrap();
    let mut tries = 0;
    loop {
        tries += 1;
        let mut node = Serve::spawn(url, prefix, id, extra);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "node {id} not online within {within:?} ({tries} starts)\n{}",
                node.log_tail()
            );
            let step = left.min(Duration::from_millis(200));
            if let Ok(Some(_)) = tokio::time::timeout(step, online.next()).await {
                if tries > 1 {
                    eprintln!("node {id} online after {tries} starts");
                }
                return node;
            }
            if node.exited() {
                eprintln!("node {id} exited before online:\n{}", node.log_tail());
                break;
            }
        }
        // Pause before starting it again.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ---------------------------------------------------------------------------
// Events

/// One task event as a watcher received it.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    event: String,
    node: String,
}

/// Every event under a subject, by task id, gathered by a background task
/// from the moment [`EventLog::follow`] returns.
struct EventLog {
    by_id: Arc<Mutex<HashMap<String, Vec<Seen>>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl EventLog {
    async fn follow(client: &async_nats::Client, subject: &str) -> Self {
        let mut sub = client.subscribe(subject.to_owned()).await.unwrap();
        client.flush().await.unwrap();
        let by_id: Arc<Mutex<HashMap<String, Vec<Seen>>>> = Arc::default();
        let sink = by_id.clone();
        let reader = tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let at = Instant::now();
                let Ok(e) = serde_json::from_slice::<Value>(&msg.payload) else {
                    continue;
                };
                let text = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
                sink.lock()
                    .unwrap()
                    .entry(text("task_id"))
                    .or_default()
                    .push(Seen {
                        at,
                        event: text("event"),
                        node: text("node"),
                    });
            }
        });
        Self { by_id, reader }
    }

    /// Tasks with at least one event named `name`.
    fn count(&self, name: &str) -> usize {
        let by_id = self.by_id.lock().unwrap();
        by_id
            .values()
            .filter(|seen| seen.iter().any(|s| s.event == name))
            .count()
    }

    /// Tasks with a final event.
    fn finished(&self) -> usize {
        let by_id = self.by_id.lock().unwrap();
        by_id.values().filter(|seen| is_final(seen)).count()
    }

    fn snapshot(&self) -> HashMap<String, Vec<Seen>> {
        self.by_id.lock().unwrap().clone()
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn is_final(seen: &[Seen]) -> bool {
    seen.iter().any(|s| FINAL.contains(&s.event.as_str()))
}

// ---------------------------------------------------------------------------
// Helpers

/// Polls `check` every 20 ms until it holds; false once `within` is over.
async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A request with a JSON body and reply, or why there was none.
async fn request(
    client: &async_nats::Client,
    subject: String,
    body: &Value,
) -> Result<Value, String> {
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        client.request(subject, body.to_string().into()),
    )
    .await
    .map_err(|_| "no reply within 5 s".to_owned())?
    .map_err(|e| e.to_string())?;
    serde_json::from_slice(&reply.payload).map_err(|e| e.to_string())
}

async fn connect(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .max_reconnects(None)
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

fn median(sorted: &[Duration]) -> Option<Duration> {
    sorted.get(sorted.len() / 2).copied()
}

fn report_path() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR is <target>/tmp")
        .join("durability-report.txt")
}

/// Waits until the JetStream API of the server at `url` answers without
/// an error (in a young cluster, once a meta leader is elected).
async fn wait_jetstream(url: &str, within: Duration) -> Duration {
    let begun = Instant::now();
    let client = connect(url).await;
    let mut last = String::new();
    while begun.elapsed() < within {
        match request(&client, "$JS.API.INFO".to_owned(), &json!({})).await {
            Ok(info) if info.get("error").is_none() => return begun.elapsed(),
            Ok(info) => last = info["error"].to_string(),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("JetStream at {url} not ready within {within:?}: {last}");
}

/// The task stream's message count and one consumer's counters, as text.
async fn queue_state(client: &async_nats::Client, stream: &str, consumer: &str) -> String {
    let js = jetstream::new(client.clone());
    let mut stream = match js.get_stream(stream).await {
        Ok(s) => s,
        Err(e) => return format!("stream {stream}: {e}"),
    };
    let messages = match stream.info().await {
        Ok(info) => info.state.messages.to_string(),
        Err(e) => e.to_string(),
    };
    let consumer = match stream.consumer_info(consumer).await {
        Ok(c) => format!(
            "consumer {consumer}: num_pending {}, num_ack_pending {}, num_redelivered {}, ack floor {}",
            c.num_pending, c.num_ack_pending, c.num_redelivered, c.ack_floor.stream_sequence
        ),
        Err(e) => format!("consumer {consumer}: {e}"),
    };
    format!("stream messages {messages}; {consumer}")
}

// ---------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_least_once_when_a_node_is_killed() {
    const TASKS: usize = 2_000;
    const KILL_AFTER: usize = 300;
    let server = LocalServer::start().unwrap();
    let url = server.url();
    let client = connect(&url).await;
    let events = EventLog::follow(&client, "crash.events.>").await;
    // Default heartbeat settings (1 s, three missed = dead): the reclaim
    // time reported below is what a deployment gets out of the box.
    let flags = ["--enable-chaos", "--workers", "10", "--ack-wait", "30s"];
    let mut nodes = Vec::new();
    for id in ["n1", "n2", "n3"] {
        nodes.push(start_online(&client, &url, "crash", id, &flags, DEADLINE).await);
    }

    // Straight onto the queue, acks awaited 500 at a time.
    let begun = Instant::now();
    let js = jetstream::new(client.clone());
    let ids: Vec<String> = (0..TASKS).map(|i| format!("t{i:04}")).collect();
    for chunk in ids.chunks(500) {
        let mut acks = Vec::with_capacity(chunk.len());
        for id in chunk {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            headers.insert("Content-Type", "application/json");
            let body = json!({"id": id, "payload": {"sleep_ms": 20}});
            let ack = js
                .publish_with_headers("crash.tasks.chaos.normal", headers, body.to_string().into())
                .await
                .expect("publish");
            acks.push(ack);
        }
        for ack in acks {
            tokio::time::timeout(DEADLINE, ack.into_future())
                .await
                .expect("publish ack within 20 s")
                .expect("stored");
        }
    }
    let submitted_in = begun.elapsed();

    assert!(
        eventually(Duration::from_secs(60), || events.count("completed")
            >= KILL_AFTER)
        .await,
        "{KILL_AFTER} tasks not completed within 60 s ({} did)\n{}",
        events.count("completed"),
        nodes
            .iter()
            .map(Serve::log_tail)
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Kill the node that is running the most tasks right now.
    let running = |snapshot: &HashMap<String, Vec<Seen>>, node: &str| {
        snapshot
            .values()
            .filter(|seen| {
                seen.last()
                    .is_some_and(|s| s.event == "started" && s.node == node)
            })
            .count()
    };
    let snapshot = events.snapshot();
    let victim = (0..nodes.len())
        .max_by_key(|&i| running(&snapshot, &nodes[i].id))
        .unwrap();
    let killed = nodes[victim].id.clone();
    let completed_at_kill = events.count("completed");
    let kill_at = Instant::now();
    nodes[victim].kill();
    let running_at_kill = running(&events.snapshot(), &killed);

    let all_final = eventually(Duration::from_secs(120), || events.finished() >= TASKS).await;
    let drained_in = kill_at.elapsed();
    let snapshot = events.snapshot();

    let lost: Vec<&String> = ids
        .iter()
        .filter(|id| !snapshot.get(*id).is_some_and(|s| is_final(s)))
        .collect();
    let failed: Vec<&String> = ids
        .iter()
        .filter(|id| {
            snapshot
                .get(*id)
                .is_some_and(|s| s.iter().any(|e| e.event == "failed"))
        })
        .collect();
    let started = |seen: &[Seen]| seen.iter().filter(|e| e.event == "started").count();
    let ran_twice = ids
        .iter()
        .filter(|id| snapshot.get(*id).is_some_and(|s| started(s) > 1))
        .count();
    let completed_twice = ids
        .iter()
        .filter(|id| {
            snapshot
                .get(*id)
                .is_some_and(|s| s.iter().filter(|e| e.event == "completed").count() > 1)
        })
        .count();
    // Tasks the killed node started and did not finish: how long until
    // another node started them again.
    let mut orphans = 0;
    let mut never_restarted = 0;
    let mut delays = Vec::new();
    for seen in snapshot.values() {
        let from_victim = |e: &Seen| e.node == killed;
        let started_there = seen.iter().any(|e| from_victim(e) && e.event == "started");
        let finished_there = seen
            .iter()
            .any(|e| from_victim(e) && FINAL.contains(&e.event.as_str()));
        if !started_there || finished_there {
            continue;
        }
        orphans += 1;
        match seen
            .iter()
            .find(|e| e.event == "started" && !from_victim(e) && e.at > kill_at)
        {
            Some(again) => delays.push(again.at - kill_at),
            None => never_restarted += 1,
        }
    }
    delays.sort();
    let mut split: BTreeMap<String, usize> = BTreeMap::new();
    for seen in snapshot.values() {
        if let Some(done) = seen.iter().find(|e| e.event == "completed") {
            *split.entry(done.node.clone()).or_default() += 1;
        }
    }

    let mut report = String::new();
    let _ = writeln!(report, "at_least_once_when_a_node_is_killed");
    let _ = writeln!(
        report,
        "  tasks: {TASKS} (chaos sleep_ms 20, 3 nodes x 10 workers, ack wait 30 s, default heartbeats)"
    );
    let _ = writeln!(report, "  submitted in: {} ms", ms(submitted_in));
    let _ = writeln!(
        report,
        "  killed: {killed} (SIGKILL) at {} ms, after {completed_at_kill} completed, running {running_at_kill}",
        ms(kill_at - begun)
    );
    let _ = writeln!(report, "  lost (no final event): {}", lost.len());
    let _ = writeln!(report, "  failed: {}", failed.len());
    let _ = writeln!(report, "  ran twice (more than one started): {ran_twice}");
    let _ = writeln!(report, "  completed twice: {completed_twice}");
    let _ = writeln!(report, "  completed by node: {split:?}");
    let _ = writeln!(
        report,
        "  started on {killed} and not finished there: {orphans} ({never_restarted} never started again)"
    );
    let _ = writeln!(
        report,
        "  kill -> started again elsewhere: median {} ms, max {} ms",
        median(&delays).map_or("-".into(), |d| ms(d).to_string()),
        delays.last().map_or("-".into(), |d| ms(*d).to_string()),
    );
    let _ = writeln!(report, "  kill -> every task final: {} ms", ms(drained_in));
    eprintln!("{report}");
    std::fs::write(report_path(), &report).expect("write target/durability-report.txt");

    let logs = nodes
        .iter()
        .map(Serve::log_tail)
        .collect::<Vec<_>>()
        .join("\n");
    let mut lost_records = Vec::new();
    if !lost.is_empty() {
        let js = jetstream::new(client.clone());
        if let Ok(kv) = js.get_key_value("crash_tasks").await {
            for id in lost.iter().take(10) {
                let record = kv.get(id.as_str()).await.ok().flatten();
                let status = record
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                    .map_or("no record".to_owned(), |r| r["status"].to_string());
                lost_records.push(format!("{id}: record {status}"));
            }
        }
        lost_records.push(queue_state(&client, "CRASH_TASKS", "chaos_normal").await);
    }
    assert!(
        all_final && lost.is_empty(),
        "{} of {TASKS} tasks have no final event within 120 s of the kill:\n{}\n{report}\n{logs}",
        lost.len(),
        lost_records.join("\n")
    );
    assert!(
        failed.is_empty(),
        "chaos sleep tasks failed: {:?}\n{report}\n{logs}",
        &failed[..failed.len().min(10)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_accepted_is_lost_when_nats_server_restarts() {
    const TASKS: usize = 500;
    const RESTART_AFTER: usize = 150;
    let mut server = LocalServer::start().unwrap();
    let url = server.url();
    let client = connect(&url).await;
    let events = EventLog::follow(&client, "crash2.events.>").await;
    let flags = [
        "--enable-chaos",
        "--workers",
        "10",
        "--heartbeat-interval",
        "1s",
        "--ack-wait",
        "10s",
        "--keep-alive-interval",
        "3s",
    ];
    let mut node = start_online(&client, &url, "crash2", "solo", &flags, DEADLINE).await;

    // One request per task; an unanswered or refused one is tried again
    // (a retry may find the id taken: `duplicate_id`).
    let accepted: Arc<Mutex<Vec<String>>> = Arc::default();
    let submitter = {
        let client = client.clone();
        let accepted = accepted.clone();
        tokio::spawn(async move {
            let mut duplicates = Vec::new();
            let mut refusals: BTreeMap<String, usize> = BTreeMap::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            for i in 0..TASKS {
                let id = format!("r{i:03}");
                let body = json!({"id": id, "payload": {"sleep_ms": 5}});
                loop {
                    assert!(
                        Instant::now() < deadline,
                        "submitting took over 60 s: {refusals:?}"
                    );
                    match request(&client, "crash2.submit.chaos".to_owned(), &body).await {
                        Ok(r) if r["ok"] == true => {
                            accepted.lock().unwrap().push(id);
                            break;
                        }
                        Ok(r) if r["error"]["code"] == "duplicate_id" => {
                            duplicates.push(id);
                            break;
                        }
                        Ok(r) => *refusals.entry(r["error"]["code"].to_string()).or_default() += 1,
                        Err(e) => *refusals.entry(e).or_default() += 1,
                    }
                    // Pause between retries while the server is away.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            (duplicates, refusals)
        })
    };

    assert!(
        eventually(DEADLINE, || accepted.lock().unwrap().len() >= RESTART_AFTER).await,
        "{RESTART_AFTER} submissions not accepted within 20 s\n{}",
        node.log_tail()
    );
    let accepted_before = accepted.lock().unwrap().len();
    let completed_before = events.count("completed");
    let restart_begun = Instant::now();
    tokio::task::block_in_place(|| server.restart()).expect("nats-server restarts");
    let restarted_in = restart_begun.elapsed();
    let (duplicates, refusals) = tokio::time::timeout(Duration::from_secs(90), submitter)
        .await
        .expect("submitting ends")
        .expect("submitter");
    let accepted = accepted.lock().unwrap().clone();

    // Events published while the server was away are gone: read the
    // records, with a plain KV get.
    let kv = {
        let js = jetstream::new(client.clone());
        let deadline = Instant::now() + DEADLINE;
        loop {
            match js.get_key_value("crash2_tasks").await {
                Ok(store) => break store,
                Err(e) => assert!(Instant::now() < deadline, "bucket crash2_tasks: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let mut pending: BTreeSet<String> = accepted.iter().cloned().collect();
    let mut last_status: BTreeMap<String, String> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pending.is_empty() && Instant::now() < deadline {
        for id in pending.clone() {
            let status = match kv.get(&id).await {
                Ok(Some(bytes)) => serde_json::from_slice::<Value>(&bytes)
                    .map(|r| r["status"].as_str().unwrap_or("?").to_owned())
                    .unwrap_or_else(|e| format!("unreadable: {e}")),
                Ok(None) => "no record".to_owned(),
                Err(e) => format!("kv error: {e}"),
            };
            if status == "completed" {
                pending.remove(&id);
            }
            last_status.insert(id, status);
        }
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut dup_status: BTreeMap<String, usize> = BTreeMap::new();
    for id in &duplicates {
        let status = match kv.get(id).await {
            Ok(Some(bytes)) => serde_json::from_slice::<Value>(&bytes)
                .map(|r| r["status"].as_str().unwrap_or("?").to_owned())
                .unwrap_or_default(),
            _ => "no record".to_owned(),
        };
        *dup_status.entry(status).or_default() += 1;
    }

    eprintln!(
        "nothing_accepted_is_lost_when_nats_server_restarts\n  \
         accepted (ok: true): {} of {TASKS}; {} before the restart, when {completed_before} had completed\n  \
         duplicate_id on a retry: {} (their records: {dup_status:?})\n  \
         refused or unanswered attempts: {refusals:?}\n  \
         nats-server restart took {} ms\n  \
         not completed within 60 s: {}\n  \
         completed events received: {} (the rest were published while the server was away)",
        accepted.len(),
        accepted_before,
        duplicates.len(),
        ms(restarted_in),
        pending.len(),
        events.count("completed"),
    );
    let queue = queue_state(&client, "CRASH2_TASKS", "chaos_normal").await;
    eprintln!("  queue after the run: {queue}");
    assert!(!node.exited(), "the node exited\n{}", node.log_tail());
    let snapshot = events.snapshot();
    let mut stuck = Vec::new();
    for id in pending.iter().take(10) {
        let status = request(&client, "crash2.api.status".to_owned(), &json!({"id": id})).await;
        let status = status.map_or_else(|e| e, |r| r["task"]["status"].to_string());
        let seen: Vec<String> = snapshot
            .get(id)
            .map(|s| {
                s.iter()
                    .map(|e| format!("{}@{}", e.event, e.node))
                    .collect()
            })
            .unwrap_or_default();
        stuck.push(format!(
            "{id}: record {}, api.status {status}, events received {seen:?}",
            last_status[id]
        ));
    }
    assert!(
        pending.is_empty(),
        "{} accepted tasks not completed within 60 s of the restart:\n{}\n{queue}\n{}",
        pending.len(),
        stuck.join("\n"),
        node.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_on_a_three_server_cluster_share_one_queue() {
    const TASKS: usize = 300;
    let servers = LocalServer::cluster(3).unwrap();
    for s in &servers {
        let took = wait_jetstream(&s.url(), Duration::from_secs(60)).await;
        eprintln!("JetStream at {} ready after {} ms", s.url(), ms(took));
    }
    let mut clients = Vec::new();
    for s in &servers {
        clients.push(connect(&s.url()).await);
    }
    let events = EventLog::follow(&clients[0], "trio.events.>").await;
    let mut nodes = Vec::new();
    for (i, (server, client)) in servers.iter().zip(&clients).enumerate() {
        let id = format!("c{}", i + 1);
        let flags = ["--workers", "2", "--heartbeat-interval", "1s"];
        nodes.push(
            start_online(
                client,
                &server.url(),
                "trio",
                &id,
                &flags,
                Duration::from_secs(60),
            )
            .await,
        );
    }

    let begun = Instant::now();
    for i in 0..TASKS {
        let body = json!({"id": format!("e{i:03}"), "payload": {"n": i}});
        let reply = request(&clients[0], "trio.submit.echo".to_owned(), &body)
            .await
            .unwrap_or_else(|e| panic!("submit e{i:03}: {e}"));
        assert_eq!(reply["ok"], true, "{reply}");
    }
    let submitted_in = begun.elapsed();
    let done = eventually(Duration::from_secs(60), || {
        events.count("completed") >= TASKS
    })
    .await;
    let logs = nodes
        .iter()
        .map(Serve::log_tail)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        done,
        "{} of {TASKS} echo tasks completed within 60 s\n{logs}",
        events.count("completed")
    );
    let mut split: BTreeMap<String, usize> = BTreeMap::new();
    for seen in events.snapshot().values() {
        if let Some(done) = seen.iter().find(|e| e.event == "completed") {
            *split.entry(done.node.clone()).or_default() += 1;
        }
    }
    eprintln!(
        "nodes_on_a_three_server_cluster_share_one_queue\n  \
         {TASKS} echo tasks submitted in {} ms, all completed after {} ms\n  \
         completed by node: {split:?}",
        ms(submitted_in),
        ms(begun.elapsed())
    );
    assert!(
        split.len() >= 2,
        "one node did all the work: {split:?}\n{logs}"
    );
}

/// Sends `signal` (`STOP`, `CONT`) to a node process.
fn signal(node: &Serve, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &node.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{signal}");
}

/// A node stopped (SIGSTOP) for longer than three heartbeats, then
/// resumed, must not take its live peer for dead on what it knew before
/// the pause: the peer's running tasks run once, on the peer. The resumed
/// node is `n1`, the smallest id, so it is the one that would reclaim.
#[tokio::test]
async fn a_resumed_node_does_not_take_a_live_peer_for_dead() {
    let server = LocalServer::start().unwrap();
    let url = server.url();
    let client = connect(&url).await;
    let events = EventLog::follow(&client, "pause.events.>").await;
    let flags = ["--enable-chaos", "--workers", "10"];
    let peer = start_online(&client, &url, "pause", "n2", &flags, DEADLINE).await;
    let ids: Vec<String> = (0..5).map(|i| format!("long-{i}")).collect();
    for id in &ids {
        let body = json!({"id": id, "payload": {"sleep_ms": 12_000}});
        let reply = request(&client, "pause.submit.chaos".into(), &body)
            .await
            .unwrap();
        assert_eq!(reply["ok"], true, "{reply}");
    }
    assert!(
        eventually(DEADLINE, || events.count("started") == ids.len()).await,
        "the long tasks did not start on n2\n{}",
        peer.log_tail()
    );
    let paused = start_online(&client, &url, "pause", "n1", &flags, DEADLINE).await;
    // n1 learns of n2 from its snapshots (one a second): wait for two.
    let mut snapshots = client.subscribe("pause.metrics.n2").await.unwrap();
    for _ in 0..2 {
        tokio::time::timeout(DEADLINE, snapshots.next())
            .await
            .unwrap();
    }
    signal(&paused, "STOP");
    // The pause itself: longer than three heartbeat intervals (1 s).
    tokio::time::sleep(Duration::from_secs(6)).await;
    signal(&paused, "CONT");
    assert!(
        eventually(Duration::from_secs(60), || events.finished() == ids.len()).await,
        "the long tasks did not finish\n{}\n{}",
        peer.log_tail(),
        paused.log_tail()
    );
    let snapshot = events.snapshot();
    for id in &ids {
        let seen = &snapshot[id];
        let starts: Vec<&Seen> = seen.iter().filter(|s| s.event == "started").collect();
        assert_eq!(
            starts.len(),
            1,
            "{id} started {} times: {seen:?}\n{}",
            starts.len(),
            paused.log_tail()
        );
        assert_eq!(starts[0].node, "n2");
    }
}

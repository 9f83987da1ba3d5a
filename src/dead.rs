//! `dispatcher dead list|replay`: the dead-letter stream (`DISPATCH_DEAD`,
//! subjects `<p>.dead.<kind>`) holds a copy of every task whose attempts
//! were spent, with its last error. An operator lists them and replays one:
//! its record is reset to `queued`, the task goes back on
//! `<p>.tasks.<kind>.<priority>` and the dead letter is removed.

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use clap::{Args, Subcommand};
use dispatcher_actors::{NodeId, TaskDefaults, TaskRecord, TaskSpec};
use dispatcher_nats::subjects::{
    CONTENT_TYPE_JSON, HEADER_CONTENT_TYPE, HEADER_MSG_ID, HEADER_REPLAY,
};
use dispatcher_nats::Subjects;
use serde_json::{json, Value};

use crate::config::Connection;

/// `dispatcher dead` settings.
#[derive(Args, Clone, Debug)]
pub struct DeadArgs {
    /// NATS connection.
    #[command(flatten)]
    pub connection: Connection,
    /// What to do.
    #[command(subcommand)]
    pub action: DeadAction,
}

/// `dispatcher dead` actions.
#[derive(Subcommand, Clone, Debug)]
pub enum DeadAction {
    /// List dead letters, newest first: id, kind, attempts, last error.
    List {
        /// Only tasks of this kind.
        #[arg(long)]
        kind: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Submit a dead task again (same id, attempts counted afresh) and
    /// remove its dead letter.
    Replay {
        /// The task's id.
        id: String,
    },
}

/// Most dead letters one command reads.
const MAX_SCAN: u64 = 100_000;

/// Runs the command; prints JSON. `Ok(false)` if the id was not found.
pub async fn run(args: DeadArgs) -> anyhow::Result<bool> {
    let subjects = Subjects::new(&args.connection.prefix)?;
    let client = args.connection.connect("dispatcher dead").await?;
    let js = jetstream::new(client);
    let name = subjects.stream_dead();
    let mut dead = js.get_stream(&name).await.with_context(|| {
        format!(
            "no dead-letter stream {name}: has a node run in jetstream mode with this --prefix?"
        )
    })?;
    match args.action {
        DeadAction::List { kind, limit } => {
            let letters = scan(
                &mut dead,
                |letter| kind.as_deref().is_none_or(|k| letter["kind"] == k),
                limit,
            )
            .await?;
            let letters: Vec<Value> = letters.into_iter().map(|(_, l)| l).collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({"ok": true, "dead": letters}))?
            );
            Ok(true)
        }
        DeadAction::Replay { id } => {
            let found = scan(&mut dead, |letter| letter["id"] == id.as_str(), 1).await?;
            let Some((seq, letter)) = found.into_iter().next() else {
                println!(
                    "{}",
                    json!({"ok": false, "error": {"code": "not_found", "message": format!("no dead letter for task {id}")}})
                );
                return Ok(false);
            };
            replay(&js, &subjects, &dead, seq, &letter).await?;
            println!("{}", json!({"ok": true, "id": id, "replayed": true}));
            Ok(true)
        }
    }
}

/// Dead letters that `keep` accepts, newest first, at most `limit`.
async fn scan(
    dead: &mut stream::Stream,
    keep: impl Fn(&Value) -> bool,
    limit: usize,
) -> anyhow::Result<Vec<(u64, Value)>> {
    let state = dead.info().await?.state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return Ok(out);
    }
    let mut seq = state.last_sequence;
    let floor = state
        .first_sequence
        .max(state.last_sequence.saturating_sub(MAX_SCAN));
    while seq >= floor && out.len() < limit {
        if let Ok(msg) = dead.get_raw_message(seq).await {
            if let Ok(letter) = serde_json::from_slice::<Value>(&msg.payload) {
                if keep(&letter) {
                    out.push((seq, letter));
                }
            }
        }
        if seq == 0 {
            break;
        }
        seq -= 1;
    }
    Ok(out)
}

async fn replay(
    js: &jetstream::Context,
    subjects: &Subjects,
    dead: &stream::Stream,
    seq: u64,
    letter: &Value,
) -> anyhow::Result<()> {
    let spec: TaskSpec = serde_json::from_value(letter["task"].clone())
        .context("the dead letter holds no task to replay")?;
    let kind = letter["kind"].as_str().unwrap_or_default().to_owned();
    let task = spec
        .clone()
        .into_task(Some(&kind), &TaskDefaults::default())
        .map_err(|e| anyhow::anyhow!("the dead task is not valid any more: {}", e.message))?;
    // Reset the shared record, so that the new attempts are not taken for
    // stale writes of the old ones.
    let records = js.get_key_value(subjects.bucket_tasks()).await?;
    let mut record = TaskRecord::queued(&task, &NodeId::new("replay").expect("a token"));
    record.node = None;
    record.attempt = 0;
    records
        .put(task.id.as_str(), serde_json::to_vec(&record)?.into())
        .await?;
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_MSG_ID, format!("{}:replay:{seq}", task.id).as_str());
    headers.insert(HEADER_CONTENT_TYPE, CONTENT_TYPE_JSON);
    headers.insert(HEADER_REPLAY, "1");
    let subject = subjects.task(&kind, task.priority);
    js.publish_with_headers(
        subject,
        headers,
        serde_json::to_vec(&task.to_spec())?.into(),
    )
    .await?
    .await
    .context("JetStream did not store the replayed task")?;
    if let Err(e) = dead.delete_message(seq).await {
        bail!("replayed, but the dead letter {seq} was not removed: {e}");
    }
    Ok(())
}

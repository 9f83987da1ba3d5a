//! `dispatcher dead list|replay`: the dead-letter stream (`DISPATCH_DEAD`,
//! subjects `<p>.dead.<kind>`) holds a copy of every task whose attempts
//! were spent, with its last error. An operator lists them and replays one:
//! through the control API's `replay` endpoint (`<p>.api.replay`), which
//! resets its record to `queued`, puts the task back on
//! `<p>.tasks.<kind>.<priority>` and removes the dead letter.

use anyhow::Context as _;
use async_nats::jetstream::{self, stream};
use clap::{Args, Subcommand};
use dispatcher_actors::TaskId;
use dispatcher_nats::{Client, ClientError, Subjects};
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
    let nats = args.connection.connect("dispatcher dead").await?;
    let js = jetstream::new(nats.clone());
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
            let id = TaskId::new(id).map_err(|e| anyhow::anyhow!("{}", e.message))?;
            let client = Client::new(nats, &args.connection.prefix)?;
            match client.replay(&id).await {
                Ok(()) => {
                    println!("{}", json!({"ok": true, "id": id, "replayed": true}));
                    Ok(true)
                }
                Err(ClientError::Rejected(error)) => {
                    println!("{}", json!({"ok": false, "error": error}));
                    Ok(false)
                }
                Err(e) => Err(e.into()),
            }
        }
    }
}

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

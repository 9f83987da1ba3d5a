//! Live progress of tasks from their events: one progress bar per task
//! while it is waiting or running, one line when it ends. `dispatcher
//! watch` and `dispatcher demo` draw with it. Without a terminal the bars
//! are hidden and every event becomes a plain line instead, so logs of a
//! pipe stay readable.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use dispatcher_actors::{EventBody, NodeEvent, NodeEventBody, TaskEvent, TaskEventName};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Bars drawn at once; tasks beyond them are tracked but not drawn.
pub const MAX_BARS: usize = 24;

/// How one task ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// Task id.
    pub id: String,
    /// Kind.
    pub kind: String,
    /// The final event's name.
    pub status: TaskEventName,
    /// Attempt of the final event.
    pub attempt: u32,
    /// Time the last attempt ran, if it completed.
    pub duration_ms: Option<u64>,
    /// The error or reason, if it did not complete.
    pub detail: String,
}

/// Draws tasks' progress from their events.
pub struct Tracker {
    multi: MultiProgress,
    bars: HashMap<String, ProgressBar>,
    style: ProgressStyle,
    ended: BTreeMap<String, Outcome>,
    retries: u64,
}

impl Default for Tracker {
    fn default() -> Self {
        Self::new()
    }
}

impl Tracker {
    /// A tracker drawing on stderr when it is a terminal.
    pub fn new() -> Self {
        Self::with_target(ProgressDrawTarget::stderr())
    }

    /// A tracker that never draws bars (every event is a line).
    pub fn plain() -> Self {
        Self::with_target(ProgressDrawTarget::hidden())
    }

    fn with_target(target: ProgressDrawTarget) -> Self {
        let style = ProgressStyle::with_template(
            "{prefix:.bold} [{bar:30.cyan/blue}] {pos:>3}% {wide_msg}",
        )
        .expect("a valid template")
        .progress_chars("=> ");
        Self {
            multi: MultiProgress::with_draw_target(target),
            bars: HashMap::new(),
            style,
            ended: BTreeMap::new(),
            retries: 0,
        }
    }

    /// Tasks that have reached a final state, by id.
    pub fn ended(&self) -> &BTreeMap<String, Outcome> {
        &self.ended
    }

    /// `retrying` events seen.
    pub fn retries(&self) -> u64 {
        self.retries
    }

    /// Prints a line above the bars (or plainly, without a terminal).
    pub fn line(&self, text: &str) {
        if self.multi.is_hidden() {
            println!("{text}");
        } else {
            let _ = self.multi.println(text);
        }
    }

    /// Takes one task event; returns its outcome if it was final.
    pub fn on_task(&mut self, event: &TaskEvent) -> Option<Outcome> {
        let id = event.task_id.as_str().to_owned();
        let label = format!("{:<8} {:<16}", event.kind.as_str(), short(&id));
        let name = event.name();
        if name.is_final() {
            let outcome = outcome(event);
            if let Some(bar) = self.bars.remove(&id) {
                bar.finish_and_clear();
                self.multi.remove(&bar);
            }
            let mark = if name == TaskEventName::Completed {
                "ok  "
            } else {
                "FAIL"
            };
            self.line(&format!(
                "{mark} {label} {} (attempt {}){}",
                name.as_str(),
                outcome.attempt,
                if outcome.detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", outcome.detail)
                }
            ));
            self.ended.insert(id, outcome.clone());
            return Some(outcome);
        }
        if matches!(event.body, EventBody::Retrying { .. }) {
            self.retries += 1;
        }
        if self.multi.is_hidden() {
            self.line(&format!("     {label} {}", describe(event)));
            return None;
        }
        if self.ended.contains_key(&id) || !self.draw_bar_for(&id) {
            return None;
        }
        let bar = self.bars.entry(id).or_insert_with(|| {
            let bar = self.multi.add(ProgressBar::new(100));
            bar.set_style(self.style.clone());
            bar.set_prefix(label);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        if let EventBody::Progress { progress, .. } = &event.body {
            bar.set_position(u64::from(*progress).min(100));
        }
        bar.set_message(describe(event));
        None
    }

    fn draw_bar_for(&self, id: &str) -> bool {
        self.bars.contains_key(id) || self.bars.len() < MAX_BARS
    }

    /// Takes one node event, shown as a line when it matters to people.
    pub fn on_node(&self, event: &NodeEvent) {
        let text = match &event.body {
            NodeEventBody::Online { workers, .. } => {
                format!("node {} online with {workers} workers", event.node)
            }
            NodeEventBody::Offline { reason } => format!("node {} offline ({reason})", event.node),
            NodeEventBody::WorkerRestarted { worker, reason, .. } => format!(
                "node {}: worker {worker} restarted after a crash ({reason})",
                event.node
            ),
            NodeEventBody::WorkerDisabled { worker, .. } => format!(
                "node {}: worker {worker} disabled, it crashed too often",
                event.node
            ),
            NodeEventBody::Heartbeat { .. } => return,
        };
        self.line(&format!("---- {text}"));
    }

    /// Removes every bar.
    pub fn clear(&mut self) {
        for (_, bar) in self.bars.drain() {
            bar.finish_and_clear();
        }
        let _ = self.multi.clear();
    }
}

fn short(id: &str) -> &str {
    if id.len() > 16 {
        &id[id.len() - 16..]
    } else {
        id
    }
}

fn describe(event: &TaskEvent) -> String {
    match &event.body {
        EventBody::Accepted { priority, .. } => format!("accepted ({priority})"),
        EventBody::Started { .. } => format!("running, attempt {}", event.attempt),
        EventBody::Progress { message, .. } => message.clone(),
        EventBody::Retrying { error, retry_in_ms } => format!(
            "attempt {} failed ({}); retry in {retry_in_ms} ms",
            event.attempt, error.message
        ),
        other => other.name().as_str().to_owned(),
    }
}

fn outcome(event: &TaskEvent) -> Outcome {
    let (duration_ms, detail) = match &event.body {
        EventBody::Completed { duration_ms, .. } => (Some(*duration_ms), String::new()),
        EventBody::Failed { error, .. } => (None, format!("{}: {}", error.code, error.message)),
        EventBody::TimedOut { timeout_ms } => (None, format!("after {timeout_ms} ms")),
        EventBody::Cancelled { reason } => (None, reason.clone()),
        EventBody::Rejected { error, .. } => (None, format!("{}: {}", error.code, error.message)),
        _ => (None, String::new()),
    };
    Outcome {
        id: event.task_id.as_str().to_owned(),
        kind: event.kind.as_str().to_owned(),
        status: event.name(),
        attempt: event.attempt,
        duration_ms,
        detail,
    }
}

//! `exec`: runs an allow-listed program, no shell, so agents written in any
//! language run as tasks. Payload `{"program": "/path", "args": [...],
//! "input": …}`. The program gets `{"id", "kind", "attempt", "payload"}`
//! (payload = `input`) as one JSON line on stdin; each stdout line
//! `{"progress": P, "message": M}` becomes a progress event and a line
//! `{"result": …}` is the result (the last one wins). A non-zero exit fails
//! the attempt with the tail of stderr.
//!
//! What a program can do to the node is bounded:
//!
//! - **Processes.** The program leads a process group of its own and its
//!   run carries a tag variable ([`group`]). The attempt ends when the
//!   program exits, whoever still holds its pipes: what it wrote is read
//!   for at most [`DRAIN`] more, then whatever it left running is stopped.
//!   On cancel or timeout the whole run is stopped: SIGTERM, and SIGKILL
//!   after the kill grace (half the node's `--cancel-grace`, so it happens
//!   before the worker gives up on the attempt). The attempt is reported
//!   over only once no process of the run is left. A descendant that both
//!   leaves the group (`setsid`) and clears its environment escapes this;
//!   a cgroup (a systemd unit, a container) is the hard boundary.
//! - **Environment.** Empty but for `PATH`, the variables named by
//!   `--exec-env` (their values when the node started) and the run tag:
//!   nothing of the node's own settings (`DISPATCH_NATS_PASSWORD`…) leaks.
//! - **Output.** stdout is read in chunks: a line longer than
//!   `--exec-max-line` is dropped as it streams past, a line that is not
//!   UTF-8 is skipped (both counted and logged), and past
//!   `--exec-max-output` bytes the rest is read and dropped so the program
//!   never blocks; the attempt then fails (permanently) saying so. stderr
//!   keeps only its last [`STDERR_TAIL`] bytes. A program that exits 0
//!   with no result line while lines were dropped fails too, rather than
//!   completing with `null`.
//! - **Programs.** `--exec-allow` entries are absolute paths to existing
//!   executables, checked at start ([`allow`]); a task's `program` must
//!   equal one of them exactly. A symlink in the list is followed at every
//!   start: it trusts whatever it points to.

mod allow;
mod group;
mod output;

use std::ffi::OsString;
use std::future::Future;
use std::io;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use async_trait::async_trait;
use dispatcher_actors::{TaskContext, TaskError, TaskHandler};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::process::{ChildStdin, Command};
use tracing::{debug, info_span, warn, Instrument as _};

pub use allow::{check_env_name, ExecConfigError};
pub use group::RUN_VAR;
use group::{RunProcesses, Stopped};
use output::{LineReader, LineStats, OutputLimits, Tail};

/// Most stderr bytes kept for the error message: the last ones written.
pub const STDERR_TAIL: usize = 4096;
/// How long the pipes are still read after the program exits.
pub const DRAIN: Duration = Duration::from_millis(100);

/// What `exec` runs and within which bounds.
#[derive(Clone, Debug)]
pub struct ExecOptions {
    /// Programs that may run: absolute paths to executables.
    pub allow: Vec<String>,
    /// The whole environment of a program (besides the run tag), e.g.
    /// `PATH` and the `--exec-env` variables with the node's values.
    pub env: Vec<(String, OsString)>,
    /// Longest stdout line kept, in bytes.
    pub max_line: usize,
    /// Bytes of stdout parsed per attempt; the rest is drained and dropped.
    pub max_output: u64,
    /// Bytes of stderr kept for the error message.
    pub stderr_tail: usize,
    /// Between SIGTERM and SIGKILL when a run is stopped.
    pub kill_grace: Duration,
}

impl Default for ExecOptions {
    /// No programs, an empty environment, 1 MiB lines, 64 MiB of output,
    /// 4 KiB of stderr, 1 s between SIGTERM and SIGKILL.
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            env: Vec::new(),
            max_line: 1 << 20,
            max_output: 64 << 20,
            stderr_tail: STDERR_TAIL,
            kill_grace: Duration::from_secs(1),
        }
    }
}

/// The `exec` handler, with its allow list and bounds.
#[derive(Debug)]
pub struct Exec {
    options: ExecOptions,
}

impl Exec {
    /// Runs only the programs in `options.allow` (compared as given), each
    /// of which must be an absolute path to an existing executable.
    pub fn new(options: ExecOptions) -> Result<Self, ExecConfigError> {
        allow::check_allow_list(&options.allow)?;
        for (name, _) in &options.env {
            check_env_name(name)?;
        }
        if options.max_line == 0 || options.max_output == 0 {
            return Err(ExecConfigError::ZeroLimit);
        }
        Ok(Self { options })
    }

    fn limits(&self) -> OutputLimits {
        OutputLimits {
            max_line: self.options.max_line,
            max_output: self.options.max_output,
        }
    }
}

/// How the program's run ended.
enum Ended {
    Exited(io::Result<ExitStatus>),
    Stopped,
}

#[async_trait]
impl TaskHandler for Exec {
    async fn run(&self, ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
        let span = info_span!("exec", task_id = %ctx.id(), attempt = ctx.attempt());
        self.attempt(ctx, payload).instrument(span).await
    }
}

impl Exec {
    async fn attempt(&self, ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
        let (program, args) = self.program(&payload)?;
        let run_id = uuid::Uuid::now_v7().simple().to_string();
        let mut child = Command::new(program)
            .args(&args)
            .env_clear()
            .envs(self.options.env.iter().map(|(k, v)| (k, v)))
            .env(RUN_VAR, &run_id)
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| TaskError::new(format!("cannot start {program}: {e}")))?;
        let broken = || TaskError::new(format!("{program}: its pipes were not set up"));
        let leader = child.id().ok_or_else(broken)?;
        // From here on, dropping this future kills what is left of the run.
        let mut run = RunProcesses::new(leader, &run_id);
        let stdin = child.stdin.take().ok_or_else(broken)?;
        let stdout = child.stdout.take().ok_or_else(broken)?;
        let stderr = child.stderr.take().ok_or_else(broken)?;
        let input = json!({
            "id": ctx.id(),
            "kind": ctx.kind(),
            "attempt": ctx.attempt(),
            "payload": payload.get("input").cloned().unwrap_or(Value::Null),
        });

        let mut lines = LineReader::new(stdout, self.limits());
        let mut tail = Tail::new(self.options.stderr_tail);
        let mut result = None;
        let ended = {
            let feed = feed(stdin, format!("{input}\n"));
            let out = read_stdout(&mut lines, &ctx, &mut result);
            let err = tail.read_from(stderr);
            tokio::pin!(feed, out, err);
            let mut pipes = Pipes::default();
            let ended = loop {
                tokio::select! {
                    _ = &mut feed, if !pipes.fed => pipes.fed = true,
                    r = &mut out, if !pipes.out => pipes.closed_out(r),
                    r = &mut err, if !pipes.err => pipes.closed_err(r),
                    status = child.wait() => break Ended::Exited(status),
                    _ = ctx.cancelled() => break Ended::Stopped,
                }
            };
            if matches!(ended, Ended::Exited(_)) {
                // What it wrote just before exiting may still be in the
                // pipes; a child it left may hold them open for ever.
                let drain = pipes.drain(&mut out, &mut err);
                tokio::select! {
                    _ = tokio::time::timeout(DRAIN, drain) => {}
                    _ = ctx.cancelled() => {}
                }
            }
            ended
        };
        // Close stdout too (stderr closed with its reader): a process left
        // behind that writes on gets EPIPE, not a full pipe.
        let stats = lines.stats();
        drop(lines);

        if let Stopped::Stuck(pids) = run.stop(&mut child, self.options.kill_grace).await {
            warn!(
                ?pids,
                "exec: reporting the attempt over with processes of its run left."
            );
        }
        if stats.lost_any() {
            warn!(
                long_lines = stats.long_lines,
                invalid_utf8 = stats.invalid_utf8,
                dropped_bytes = stats.bytes_dropped,
                "exec: stdout was cut."
            );
        }
        match ended {
            Ended::Stopped => Err(TaskError::new(format!(
                "{program} stopped: the attempt was cancelled"
            ))),
            Ended::Exited(Err(e)) => Err(TaskError::new(format!("waiting for {program}: {e}"))),
            Ended::Exited(Ok(status)) => self.outcome(program, status, result, stats, &tail),
        }
    }

    /// The allowed program and its arguments, from the payload.
    fn program<'p>(&self, payload: &'p Value) -> Result<(&'p str, Vec<String>), TaskError> {
        let program = payload["program"]
            .as_str()
            .ok_or_else(|| TaskError::permanent("payload needs `program`"))?;
        if !self.options.allow.iter().any(|a| a == program) {
            return Err(TaskError::permanent(format!(
                "program {program:?} is not allowed on this node (see --exec-allow)"
            )));
        }
        let args = match &payload["args"] {
            Value::Null => Vec::new(),
            Value::Array(items) => items
                .iter()
                .map(|a| a.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| TaskError::permanent("`args` must be strings"))?,
            _ => return Err(TaskError::permanent("`args` must be an array of strings")),
        };
        Ok((program, args))
    }

    /// The attempt's end once the program exited and its run is gone.
    fn outcome(
        &self,
        program: &str,
        status: ExitStatus,
        result: Option<Value>,
        stats: LineStats,
        tail: &Tail,
    ) -> Result<Value, TaskError> {
        if !status.success() {
            return Err(TaskError::new(format!(
                "{program} exited with {status}: {}",
                tail.to_text().trim()
            )));
        }
        if stats.bytes_dropped > 0 {
            return Err(TaskError::permanent(format!(
                "{program} wrote more than {} bytes to stdout (--exec-max-output); \
                 the {} bytes past it were discarded",
                self.options.max_output, stats.bytes_dropped
            )));
        }
        match result {
            Some(result) => Ok(result),
            None if stats.long_lines > 0 || stats.invalid_utf8 > 0 => {
                Err(TaskError::permanent(format!(
                    "{program} exited 0 without a result line; {} stdout line(s) longer than \
                     {} bytes (--exec-max-line) and {} not UTF-8 were dropped",
                    stats.long_lines, self.options.max_line, stats.invalid_utf8
                )))
            }
            None => Ok(Value::Null),
        }
    }
}

/// Which of the program's pipes are done with.
#[derive(Default)]
struct Pipes {
    fed: bool,
    out: bool,
    err: bool,
}

impl Pipes {
    fn closed_out(&mut self, r: io::Result<()>) {
        self.out = true;
        if let Err(e) = r {
            debug!(error = %e, "exec: reading stdout failed.");
        }
    }

    fn closed_err(&mut self, r: io::Result<()>) {
        self.err = true;
        if let Err(e) = r {
            debug!(error = %e, "exec: reading stderr failed.");
        }
    }

    /// Reads both pipes until they close.
    async fn drain<O, E>(&mut self, out: &mut O, err: &mut E)
    where
        O: Future<Output = io::Result<()>> + Unpin,
        E: Future<Output = io::Result<()>> + Unpin,
    {
        loop {
            tokio::select! {
                r = &mut *out, if !self.out => self.closed_out(r),
                r = &mut *err, if !self.err => self.closed_err(r),
                else => return,
            }
        }
    }
}

/// Writes the task line to stdin and closes it. A program that does not
/// read its input may close stdin early: that is no error.
async fn feed(mut stdin: ChildStdin, line: String) {
    if stdin.write_all(line.as_bytes()).await.is_ok() {
        let _ = stdin.shutdown().await;
    }
}

/// Turns stdout lines into progress events and the result.
async fn read_stdout<R: AsyncRead + Unpin>(
    lines: &mut LineReader<R>,
    ctx: &TaskContext,
    result: &mut Option<Value>,
) -> io::Result<()> {
    while let Some(line) = lines.next_line().await? {
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if let Some(r) = v.get("result") {
            *result = Some(r.clone());
        } else if let Some(p) = v["progress"].as_u64() {
            let message = v["message"].as_str().unwrap_or("").to_owned();
            ctx.progress(p.min(100) as u8, message);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;

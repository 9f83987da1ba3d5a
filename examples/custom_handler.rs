//! A node that serves a handler of your own, `resize`, next to the built-in
//! ones (`echo`, `sleep`; `chaos` with `--enable-chaos`, `exec` with
//! `--exec-allow`), over NATS.
//!
//! `Resize` implements [`TaskHandler`]: it checks its payload and fails at
//! once, without retries, on one it cannot use ([`TaskError::permanent`]),
//! reports progress through the [`TaskContext`] as it goes, and stops when
//! the task is cancelled or times out. The image is generated (a gradient),
//! so that the example needs no files and no image crate; the resampling,
//! nearest neighbour in ten bands, is real work, done off the async
//! threads with `spawn_blocking`. It keeps the default placement (its
//! attempts run on their worker slot's own thread); a handler that only
//! awaits could return `Placement::EventLoop` from `placement()` and run
//! beside the node's actors instead.
//!
//! Run a nats-server, then the example, then submit from another terminal:
//!
//! ```text
//! nats-server -js &
//! cargo run --example custom_handler
//! cargo run -- submit resize '{"from": [4000, 3000], "to": [800, 600]}' --wait
//! cargo run -- submit resize '{"to": [0, 600]}' --wait   # fails at once: bad size
//! ```
//!
//! (or `dispatcher submit resize '{…}' --wait` with a built binary). The
//! payload is `{"from": [w, h], "to": [w, h], "pace_ms": n}`: `from`
//! defaults to 1920 × 1080 and `pace_ms`, a pause after each band that
//! stands in for I/O so that progress can be watched, to 100.
//!
//! The example takes every flag and `DISPATCH_*` variable of
//! `dispatcher serve` (`cargo run --example custom_handler -- --help`):
//! `DISPATCH_NATS_URL` names the server (default `nats://127.0.0.1:4222`),
//! `--prefix`, `--workers`, `--node-id` and the rest work as there.
//! Ctrl-C (or SIGTERM) drains the node and stops it.
//!
//! Nodes on one prefix share its submit and task subjects, so a node that
//! lacks `resize` may be the one that receives a `resize` task, and it
//! rejects it (`unknown_kind`). Run this node alone on its prefix, or give
//! it one of its own (`--prefix imaging`, and the same `--prefix` when
//! submitting).

use std::ops::Range;
use std::process::ExitCode;
use std::time::Duration;

use async_trait::async_trait;
use clap::Parser;
use dispatcher::config::ServeConfig;
use dispatcher_actors::{Handlers, TaskContext, TaskError, TaskHandler, TaskKind};
use serde::Deserialize;
use serde_json::{json, Value};

/// The largest width or height `resize` accepts, on either side.
const MAX_SIDE: u32 = 16_384;
/// Progress steps: the output is made in this many bands of rows.
const BANDS: u32 = 10;

/// `resize`'s payload.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResizeRequest {
    /// The source image's width and height.
    #[serde(default = "default_from")]
    from: [u32; 2],
    /// The output's width and height.
    to: [u32; 2],
    /// Pause after each band, in milliseconds.
    #[serde(default = "default_pace_ms")]
    pace_ms: u64,
}

fn default_from() -> [u32; 2] {
    [1920, 1080]
}

fn default_pace_ms() -> u64 {
    100
}

impl ResizeRequest {
    /// Reads and checks a payload. Every error is permanent: the same
    /// payload would fail the same way on every attempt.
    fn parse(payload: Value) -> Result<Self, TaskError> {
        let request: Self = serde_json::from_value(payload).map_err(|e| {
            TaskError::permanent(format!(
                "payload must be {{\"from\": [w, h], \"to\": [w, h], \"pace_ms\": n}}: {e}"
            ))
        })?;
        for (name, [width, height]) in [("from", request.from), ("to", request.to)] {
            if !(1..=MAX_SIDE).contains(&width) || !(1..=MAX_SIDE).contains(&height) {
                return Err(TaskError::permanent(format!(
                    "`{name}` is {width} × {height}; each side must be 1 to {MAX_SIDE}"
                )));
            }
        }
        if request.pace_ms > 10_000 {
            return Err(TaskError::permanent("`pace_ms` must be at most 10000"));
        }
        Ok(request)
    }
}

/// The `resize` handler.
struct Resize;

#[async_trait]
impl TaskHandler for Resize {
    async fn run(&self, ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
        let request = ResizeRequest::parse(payload)?;
        let [width, height] = request.to;
        let mut checksum = Fnv1a::new();
        for band in 0..BANDS {
            let rows = height * band / BANDS..height * (band + 1) / BANDS;
            // CPU-bound work goes to the blocking pool, so that it holds up
            // no async thread; each band is short, so a cancel is noticed
            // soon after it is asked for.
            let from = request.from;
            let to = request.to;
            let band_rows = rows.clone();
            checksum = tokio::task::spawn_blocking(move || {
                let mut hash = checksum;
                resample(from, to, band_rows, &mut hash);
                hash
            })
            .await
            .map_err(|e| TaskError::new(format!("resampling stopped: {e}")))?;
            ctx.progress(
                ((band + 1) * 100 / BANDS) as u8,
                format!("rows {} to {} of {height}", rows.start, rows.end),
            );
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(request.pace_ms)) => {}
                // Cancelled, timed out, or the node is shutting down. The
                // error is retryable: another attempt, if the task is
                // retried at all, may well finish.
                _ = ctx.cancelled() => return Err(TaskError::new(format!(
                    "stopped after {} of {height} rows", rows.end
                ))),
            }
        }
        Ok(json!({
            "from": request.from,
            "to": request.to,
            "pixels": u64::from(width) * u64::from(height),
            "checksum": format!("{:016x}", checksum.finish()),
        }))
    }
}

/// Writes rows `rows` of the `to`-sized output, nearest neighbour from a
/// `from`-sized gradient, into `hash`.
fn resample(from: [u32; 2], to: [u32; 2], rows: Range<u32>, hash: &mut Fnv1a) {
    let [src_w, src_h] = from.map(u64::from);
    let [dst_w, dst_h] = to.map(u64::from);
    for y in rows {
        let sy = u64::from(y) * src_h / dst_h;
        for x in 0..dst_w {
            let sx = x * src_w / dst_w;
            // The source pixel at (sx, sy): a diagonal gradient.
            let pixel = ((sx + sy) * 255 / (src_w + src_h)) as u8;
            hash.write(pixel);
        }
    }
}

/// FNV-1a, 64 bits: a checksum of the output, so the result shows that the
/// work was done.
#[derive(Clone, Copy)]
struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, byte: u8) {
        self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }

    fn finish(self) -> u64 {
        self.0
    }
}

/// A node serving `resize` and the built-in handlers.
#[derive(Parser)]
#[command(about = "A dispatcher node that also serves `resize`.")]
struct Args {
    #[command(flatten)]
    serve: ServeConfig,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("DISPATCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    // The node's actors need an actix System; `block_on` runs it until
    // `run` returns.
    match actix::System::new().block_on(run(args.serve)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Serves the built-ins plus `resize` until Ctrl-C or SIGTERM, then drains.
async fn run(config: ServeConfig) -> anyhow::Result<()> {
    let register = |handlers: &mut Handlers| {
        handlers.insert(TaskKind::new("resize")?, Resize);
        Ok(())
    };
    dispatcher::node::run_with(config, register, dispatcher::node::shutdown_signal()).await
}

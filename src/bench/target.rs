//! What the driver feeds and times: a ceiling's responder or a node, the
//! way tasks reach it, and the closed loop that times each task from its
//! publish to its `completed` message.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use async_nats::jetstream::{self, consumer, stream};
use dispatcher_actors::{Priority, TaskEventName};
use dispatcher_nats::subjects::HEADER_MSG_ID;
use dispatcher_nats::{Mode, Subjects};
use futures::stream::{BoxStream, FuturesUnordered};
use futures::StreamExt;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use super::node::{clock_ticks, NodeProcess};
use super::responder::Responder;
use super::{connect, BenchArgs, Column, Figures, CEILING_CONSUMER, KIND};

/// A JetStream id published again within this is dropped (the node's default).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// Pause after a throughput run before CPU time is read again, so work
/// the run left behind (KV record writes trail their events) is counted.
const SETTLE: Duration = Duration::from_millis(250);

/// How a task reaches what is measured.
enum Feed {
    /// A core publish onto the task subject.
    Publish,
    /// A JetStream publish with `Nats-Msg-Id`; acks awaited pipelined.
    JetStream(Box<jetstream::Context>),
    /// A request to the submit subject; replies awaited pipelined.
    Request,
}

/// Acks and replies not yet in.
type Pending = FuturesUnordered<Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>>;

/// What the driver feeds and listens to, and what serves it.
pub(super) struct Target {
    client: async_nats::Client,
    subjects: Subjects,
    feed: Feed,
    to: String,
    completed: async_nats::Subscriber,
    trouble: BoxStream<'static, async_nats::Message>,
    backend: Backend,
    payload: String,
    next_id: u64,
    /// Streams and KV buckets to delete once stopped.
    streams: Vec<String>,
    buckets: Vec<String>,
}

/// No task completed for this long: lost (core NATS is at most once) or
/// stuck.
#[derive(Debug, thiserror::Error)]
#[error("none completed for {after:?}")]
pub(super) struct Stalled {
    after: Duration,
}

/// One timed run.
struct Run {
    elapsed: Duration,
    latencies: Histogram<u64>,
}

impl Target {
    pub(super) async fn start(
        args: &BenchArgs,
        url: &str,
        mode: Mode,
        column: Column,
    ) -> anyhow::Result<Self> {
        let tag = rand::random::<u32>() & 0xff_ffff;
        let client = connect(url, "dispatcher bench").await?;
        let jetstream = mode == Mode::JetStream;
        let (subjects, backend, mut streams, mut buckets) = if column == Column::Ceiling {
            let subjects = Subjects::new(&format!("bench-ceiling-{tag:06x}"))?;
            let mut streams = Vec::new();
            if jetstream {
                create_ceiling_stream(&client, &subjects).await?;
                streams.push(subjects.stream_tasks());
            }
            let responder = Responder::start(url, &subjects, jetstream).await;
            let backend = match responder {
                Ok(r) => Backend::Responder(r),
                Err(e) => {
                    delete_all(&client, &streams, &[]).await;
                    return Err(e);
                }
            };
            (subjects, backend, streams, Vec::new())
        } else {
            let subjects = Subjects::new(&format!("bench-{}-{tag:06x}", mode.as_str()))?;
            let node =
                NodeProcess::start(&client, url, &subjects, mode, args.workers, "node").await?;
            let (streams, buckets) = if jetstream {
                (
                    vec![subjects.stream_tasks(), subjects.stream_dead()],
                    vec![subjects.bucket_tasks(), subjects.bucket_cancels()],
                )
            } else {
                (Vec::new(), Vec::new())
            };
            (subjects, Backend::Node(node), streams, buckets)
        };
        let subscribed = async {
            let completed = client
                .subscribe(subjects.event(KIND, "*", TaskEventName::Completed))
                .await?;
            let trouble: BoxStream<'static, async_nats::Message> = if column == Column::Ceiling {
                futures::stream::pending().boxed()
            } else {
                let failed = client
                    .subscribe(subjects.event(KIND, "*", TaskEventName::Failed))
                    .await?;
                let rejected = client
                    .subscribe(subjects.event("*", "*", TaskEventName::Rejected))
                    .await?;
                futures::stream::select(failed, rejected).boxed()
            };
            client.flush().await?;
            anyhow::Ok((completed, trouble))
        }
        .await;
        let (completed, trouble) = match subscribed {
            Ok(s) => s,
            Err(e) => {
                delete_all(
                    &client,
                    &std::mem::take(&mut streams),
                    &std::mem::take(&mut buckets),
                )
                .await;
                return Err(e.context("subscribing to completed events"));
            }
        };
        let (feed, to) = match column {
            Column::Submit => (Feed::Request, subjects.submit(KIND)),
            _ if jetstream => (
                Feed::JetStream(Box::new(jetstream::new(client.clone()))),
                subjects.task(KIND, Priority::Normal),
            ),
            _ => (Feed::Publish, subjects.task(KIND, Priority::Normal)),
        };
        Ok(Self {
            client,
            subjects,
            feed,
            to,
            completed,
            trouble,
            backend,
            payload: payload(args.payload_bytes),
            next_id: 0,
            streams,
            buckets,
        })
    }

    /// Warm-up, throughput (with CPU time), then one at a time.
    pub(super) async fn measure(&mut self, args: &BenchArgs, tag: &str) -> anyhow::Result<Figures> {
        let warm_up = (args.tasks / 10).clamp(1, 1_000);
        self.drive(args, warm_up, args.window, &format!("{tag} warm-up"))
            .await?;
        let cpu_before = self.backend.cpu_ticks();
        let load = self
            .drive(args, args.tasks, args.window, &format!("{tag} throughput"))
            .await?;
        tokio::time::sleep(SETTLE).await;
        let cpu_after = self.backend.cpu_ticks();
        let single = self
            .drive(
                args,
                args.latency_tasks.min(args.tasks),
                1,
                &format!("{tag} latency"),
            )
            .await?;
        let per_1000 =
            |ticks: u64| ticks as f64 / clock_ticks() as f64 / args.tasks as f64 * 1000.0;
        let at = |h: &Histogram<u64>, q: f64| Some(h.value_at_quantile(q) as f64);
        Ok(Figures {
            throughput_per_s: Some(args.tasks as f64 / load.elapsed.as_secs_f64().max(1e-9)),
            p50_us: at(&single.latencies, 0.5),
            p99_us: at(&single.latencies, 0.99),
            p999_us: at(&single.latencies, 0.999),
            p99_window_us: at(&load.latencies, 0.99),
            cpu_s_per_1000: cpu_before
                .zip(cpu_after)
                .map(|(b, a)| per_1000(a.saturating_sub(b))),
            rss_mib: self.backend.peak_rss_kib().map(|kib| kib as f64 / 1024.0),
        })
    }

    /// Runs `count` tasks with at most `window` in flight; each is timed
    /// from its publish to its `completed` message.
    async fn drive(
        &mut self,
        args: &BenchArgs,
        count: u64,
        window: u64,
        phase: &str,
    ) -> anyhow::Result<Run> {
        let bar = progress_bar(count, phase);
        let mut latencies = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
            .map_err(|e| anyhow!("histogram bounds: {e}"))?;
        let mut in_flight: HashMap<u64, Instant> = HashMap::with_capacity(window as usize);
        let mut pending = Pending::new();
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let (mut sent, mut done) = (0u64, 0u64);
        let start = Instant::now();
        let mut last_progress = start;
        // The caller's context names the mode and the column.
        let missing = |done: u64| format!("{} of {count} tasks missing", count - done);
        while done < count {
            while sent < count && (in_flight.len() as u64) < window {
                let id = self.next_id;
                self.next_id += 1;
                in_flight.insert(id, Instant::now());
                self.send(id, &mut pending)
                    .await
                    .with_context(|| missing(done))?;
                sent += 1;
            }
            tokio::select! {
                msg = self.completed.next() => {
                    let msg = msg.ok_or_else(|| anyhow!("the NATS connection closed"))
                        .with_context(|| missing(done))?;
                    let id = self.subjects.token(&msg.subject, 2).and_then(parse_id);
                    if let Some(started) = id.and_then(|id| in_flight.remove(&id)) {
                        let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                        latencies.saturating_record(us.max(1));
                        done += 1;
                        last_progress = Instant::now();
                        bar.inc(1);
                    }
                }
                Some(result) = pending.next(), if !pending.is_empty() => {
                    result.with_context(|| missing(done))?;
                }
                Some(msg) = self.trouble.next() => {
                    bar.finish_and_clear();
                    bail!("{}: a task did not complete: {}", missing(done), String::from_utf8_lossy(&msg.payload));
                }
                _ = tick.tick() => {
                    if let Err(e) = self.backend.check() {
                        bar.finish_and_clear();
                        return Err(e.context(missing(done)));
                    }
                    if last_progress.elapsed() > args.timeout {
                        bar.finish_and_clear();
                        return Err(anyhow::Error::new(Stalled { after: args.timeout })
                            .context(missing(done)));
                    }
                }
            }
        }
        let elapsed = start.elapsed();
        bar.finish_and_clear();
        let acks = async {
            while let Some(result) = pending.next().await {
                result?;
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(args.timeout, acks)
            .await
            .map_err(|_| {
                anyhow!(
                    "acks or replies still missing {:?} after the last task completed",
                    args.timeout
                )
            })??;
        Ok(Run { elapsed, latencies })
    }

    async fn send(&mut self, id: u64, pending: &mut Pending) -> anyhow::Result<()> {
        let body = format!("{{\"id\":\"t{id}\",\"payload\":{}}}", self.payload);
        match &self.feed {
            Feed::Publish => self.client.publish(self.to.clone(), body.into()).await?,
            Feed::JetStream(js) => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(HEADER_MSG_ID, format!("t{id}").as_str());
                let ack = js
                    .publish_with_headers(self.to.clone(), headers, body.into())
                    .await?;
                pending.push(Box::pin(async move {
                    ack.await
                        .context("a JetStream publish was not acknowledged")?;
                    Ok(())
                }));
            }
            Feed::Request => {
                let client = self.client.clone();
                let subject = self.to.clone();
                pending.push(Box::pin(async move {
                    let reply = client
                        .request(subject, body.into())
                        .await
                        .context("a submit request")?;
                    let ok = serde_json::from_slice::<Value>(&reply.payload)
                        .ok()
                        .and_then(|v| v.get("ok").and_then(Value::as_bool));
                    if ok != Some(true) {
                        bail!(
                            "a submission was refused: {}",
                            String::from_utf8_lossy(&reply.payload)
                        );
                    }
                    Ok(())
                }));
            }
        }
        Ok(())
    }

    /// Stops the node or responder, then deletes what the run created.
    pub(super) async fn stop(mut self) -> anyhow::Result<()> {
        let result = self.backend.stop().await;
        delete_all(&self.client, &self.streams, &self.buckets).await;
        result
    }
}

/// `t<id>` back to `id`.
fn parse_id(token: &str) -> Option<u64> {
    token.strip_prefix('t')?.parse().ok()
}

/// A JSON object of exactly `bytes` bytes.
fn payload(bytes: u64) -> String {
    // `{"data":""}` is 11 bytes; the rest is padding.
    let pad = usize::try_from(bytes.saturating_sub(11)).unwrap_or(0);
    format!("{{\"data\":\"{}\"}}", "x".repeat(pad))
}

fn progress_bar(count: u64, phase: &str) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{prefix:46} [{bar:30}] {pos:>7}/{len:7} {per_sec:>14} {elapsed:>4}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::new(count)
        .with_style(style)
        .with_prefix(phase.to_owned())
}

/// The ceiling's work-queue stream (file storage) and durable pull consumer.
async fn create_ceiling_stream(
    client: &async_nats::Client,
    subjects: &Subjects,
) -> anyhow::Result<()> {
    let js = jetstream::new(client.clone());
    let stream = js
        .create_stream(stream::Config {
            name: subjects.stream_tasks(),
            description: Some("dispatcher bench: the JetStream ceiling's queue".to_owned()),
            subjects: vec![subjects.tasks_all()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating stream {}", subjects.stream_tasks()))?;
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(CEILING_CONSUMER.to_owned()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating consumer {CEILING_CONSUMER}"))?;
    Ok(())
}

/// Deletes streams and KV buckets, warning about those that stay.
pub(super) async fn delete_all(
    client: &async_nats::Client,
    streams: &[String],
    buckets: &[String],
) {
    let js = jetstream::new(client.clone());
    for name in streams {
        if let Err(e) = js.delete_stream(name).await {
            tracing::warn!(stream = %name, error = %e, "Stream not deleted.");
        }
    }
    for name in buckets {
        if let Err(e) = js.delete_key_value(name).await {
            tracing::warn!(bucket = %name, error = %e, "KV bucket not deleted.");
        }
    }
}

/// What serves the tasks.
enum Backend {
    Responder(Responder),
    Node(NodeProcess),
}

impl Backend {
    /// An error once the responder or the node has stopped on its own.
    fn check(&mut self) -> anyhow::Result<()> {
        match self {
            Backend::Responder(r) => r.check(),
            Backend::Node(n) => n.check(),
        }
    }

    /// CPU time (user + system) in clock ticks.
    fn cpu_ticks(&self) -> Option<u64> {
        match self {
            Backend::Responder(r) => r.cpu_ticks(),
            Backend::Node(n) => n.cpu_ticks(),
        }
    }

    /// Peak resident set of the node, in KiB.
    fn peak_rss_kib(&self) -> Option<u64> {
        match self {
            Backend::Responder(_) => None,
            Backend::Node(n) => n.peak_rss_kib(),
        }
    }

    async fn stop(&mut self) -> anyhow::Result<()> {
        match self {
            Backend::Responder(r) => r.stop().await,
            Backend::Node(n) => n.stop().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_have_the_size_asked_for() {
        for n in [16, 200, 4096] {
            let p = payload(n);
            assert_eq!(p.len() as u64, n);
            assert!(serde_json::from_str::<Value>(&p).is_ok());
        }
    }

    #[test]
    fn ids_round_trip() {
        assert_eq!(parse_id("t42"), Some(42));
        assert_eq!(parse_id("42"), None);
    }
}

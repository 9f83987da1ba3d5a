//! The ceiling's bare responder: what any dispatcher has to do at least,
//! with nothing else. It runs on a thread of its own, with its own runtime
//! and NATS connection, as a node has its own process.

use anyhow::{anyhow, bail, Context as _};
use async_nats::jetstream::{self, consumer};
use dispatcher_actors::{Priority, TaskEventName};
use dispatcher_nats::Subjects;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::node::cpu_ticks;
use super::{connect, CEILING_CONSUMER, KIND, START_DEADLINE, STOP_DEADLINE};

/// Largest pull of the responder (the node's `--fetch-batch` default).
const FETCH_BATCH: usize = 256;

/// The ceiling's bare responder: a thread with its own runtime and NATS
/// connection, as a node would have its own process.
pub(super) struct Responder {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    /// The thread's id, for its CPU time.
    tid: Option<u32>,
}

impl Responder {
    pub(super) async fn start(
        url: &str,
        subjects: &Subjects,
        jetstream: bool,
    ) -> anyhow::Result<Self> {
        let (stop_tx, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (url, subjects) = (url.to_owned(), subjects.clone());
        let thread = std::thread::Builder::new()
            .name("bench-responder".into())
            .spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(respond(url, subjects, jetstream, ready_tx, stop_rx))
            })
            .context("starting the responder thread")?;
        let mut responder = Self {
            stop: Some(stop_tx),
            thread: Some(thread),
            tid: None,
        };
        match tokio::time::timeout(START_DEADLINE, ready_rx).await {
            Ok(Ok(Ok(tid))) => {
                responder.tid = tid;
                Ok(responder)
            }
            Ok(Ok(Err(e))) => Err(anyhow!("the responder could not start: {e}")),
            Ok(Err(_)) => Err(responder
                .stop()
                .await
                .err()
                .unwrap_or_else(|| anyhow!("the responder stopped before it was ready"))),
            Err(_) => bail!("the responder was not ready within {START_DEADLINE:?}"),
        }
    }

    /// The thread's CPU time (user + system) so far, in clock ticks.
    pub(super) fn cpu_ticks(&self) -> Option<u64> {
        cpu_ticks(&format!("/proc/self/task/{}/stat", self.tid?))
    }

    pub(super) fn check(&mut self) -> anyhow::Result<()> {
        if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            return match self.thread.take().map(|t| t.join()) {
                Some(Ok(Err(e))) => Err(e.context("the responder stopped")),
                _ => Err(anyhow!("the responder stopped")),
            };
        }
        Ok(())
    }

    pub(super) async fn stop(&mut self) -> anyhow::Result<()> {
        self.stop.take();
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let joined = tokio::time::timeout(
            STOP_DEADLINE,
            tokio::task::spawn_blocking(move || thread.join()),
        )
        .await
        .map_err(|_| anyhow!("the responder did not stop within {STOP_DEADLINE:?}"))??;
        joined.map_err(|_| anyhow!("the responder panicked"))?
    }
}

/// The responder's loop: each task gets `started`, an ack (JetStream) and
/// `completed` echoing its payload, as a node's would.
async fn respond(
    url: String,
    subjects: Subjects,
    jetstream: bool,
    ready: oneshot::Sender<Result<Option<u32>, String>>,
    mut stop: oneshot::Receiver<()>,
) -> anyhow::Result<()> {
    enum Input {
        Core(async_nats::Subscriber),
        JetStream(Box<consumer::pull::Stream>),
    }
    let setup = async {
        let client = connect(&url, "dispatcher bench responder").await?;
        let input = if jetstream {
            let js = jetstream::new(client.clone());
            let consumer: consumer::PullConsumer = js
                .get_stream(subjects.stream_tasks())
                .await?
                .get_consumer(CEILING_CONSUMER)
                .await
                .map_err(|e| anyhow!("consumer {CEILING_CONSUMER}: {e}"))?;
            let messages = consumer
                .stream()
                .max_messages_per_batch(FETCH_BATCH)
                .messages()
                .await?;
            Input::JetStream(Box::new(messages))
        } else {
            Input::Core(
                client
                    .subscribe(subjects.task(KIND, Priority::Normal))
                    .await?,
            )
        };
        client.flush().await?;
        anyhow::Ok((client, input))
    };
    let (client, mut input) = match setup.await {
        Ok(ready_to_go) => {
            let _ = ready.send(Ok(thread_id()));
            ready_to_go
        }
        Err(e) => {
            let _ = ready.send(Err(format!("{e:#}")));
            return Err(e);
        }
    };
    loop {
        match &mut input {
            Input::Core(sub) => tokio::select! {
                _ = &mut stop => return Ok(()),
                msg = sub.next() => {
                    let msg = msg.ok_or_else(|| anyhow!("the responder's subscription ended"))?;
                    answer(&client, &subjects, &msg.payload, None).await?;
                }
            },
            Input::JetStream(messages) => tokio::select! {
                _ = &mut stop => return Ok(()),
                msg = messages.next() => match msg {
                    Some(Ok(msg)) => answer(&client, &subjects, &msg.payload, Some(&msg)).await?,
                    Some(Err(e)) => tracing::debug!(error = %e, "Pull hiccup."),
                    None => bail!("the responder's pull stream ended"),
                },
            },
        }
    }
}

async fn answer(
    client: &async_nats::Client,
    subjects: &Subjects,
    body: &[u8],
    delivery: Option<&jetstream::Message>,
) -> anyhow::Result<()> {
    let task: Value = serde_json::from_slice(body).context("a task that is not JSON")?;
    let id = task["id"].as_str().context("a task without an id")?;
    let started = json!({"event": TaskEventName::Started.as_str(), "task_id": id});
    client
        .publish(
            subjects.event(KIND, id, TaskEventName::Started),
            started.to_string().into(),
        )
        .await?;
    if let Some(delivery) = delivery {
        delivery.ack().await.map_err(|e| anyhow!("acking: {e}"))?;
    }
    let completed = json!({
        "event": TaskEventName::Completed.as_str(),
        "task_id": id,
        "result": task["payload"],
    });
    client
        .publish(
            subjects.event(KIND, id, TaskEventName::Completed),
            completed.to_string().into(),
        )
        .await?;
    Ok(())
}

/// This thread's id, from `/proc/thread-self` (`<pid>/task/<tid>`).
fn thread_id() -> Option<u32> {
    std::fs::read_link("/proc/thread-self")
        .ok()?
        .file_name()?
        .to_str()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_knows_its_id() {
        let tid = thread_id().expect("a thread id");
        assert!(cpu_ticks(&format!("/proc/self/task/{tid}/stat")).is_some());
    }
}

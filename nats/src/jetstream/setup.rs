//! Start-up: the task stream (work-queue), the dead-letter stream, the
//! error stream and the KV buckets, created when missing and checked when present, with errors
//! that say what to do.

use async_nats::jetstream::{self, kv, stream};

use super::JetStreamOptions;
use crate::subjects::Subjects;

/// The JetStream handles a node works with.
#[derive(Clone)]
pub struct Durable {
    /// The JetStream context.
    pub js: jetstream::Context,
    /// The task stream (`DISPATCH_TASKS`).
    pub tasks: stream::Stream,
    /// Task records (`dispatch_tasks`).
    pub records: kv::Store,
    /// Cancel requests (`dispatch_cancels`).
    pub cancels: kv::Store,
    /// Failed attempts of the whole cluster (`DISPATCH_ERRORS`).
    pub errors: stream::Stream,
}

/// Why JetStream could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The server has no JetStream.
    #[error(
        "the NATS server has no JetStream ({0}): start it with `nats-server -js`, \
         or run the node with --mode core (at most once)"
    )]
    NoJetStream(String),
    /// A stream or bucket exists with settings that do not fit.
    #[error("{0}")]
    Mismatch(String),
    /// Any other JetStream error.
    #[error("setting up JetStream ({what}): {source}")]
    Other {
        /// What was being done.
        what: String,
        /// The error.
        source: async_nats::Error,
    },
}

fn other(what: impl Into<String>) -> impl FnOnce(async_nats::Error) -> SetupError {
    let what = what.into();
    move |source| SetupError::Other { what, source }
}

/// Creates or checks every stream and bucket.
pub async fn setup(
    client: async_nats::Client,
    subjects: &Subjects,
    options: &JetStreamOptions,
) -> Result<Durable, SetupError> {
    let info = client.server_info();
    if !info.jetstream {
        return Err(SetupError::NoJetStream(format!(
            "server {} at version {}",
            info.server_name, info.version
        )));
    }
    let js = jetstream::new(client);

    let tasks_name = subjects.stream_tasks();
    let mut tasks = js
        .get_or_create_stream(stream::Config {
            name: tasks_name.clone(),
            description: Some("dispatcher task queue".to_owned()),
            subjects: vec![subjects.tasks_all()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: options.storage,
            num_replicas: options.replicas,
            duplicate_window: options.duplicate_window,
            ..Default::default()
        })
        .await
        .map_err(|e| other(format!("stream {tasks_name}"))(e.into()))?;
    let info = tasks
        .info()
        .await
        .map_err(|e| other(format!("stream {tasks_name}"))(e.into()))?;
    if info.config.retention != stream::RetentionPolicy::WorkQueue
        || !info.config.subjects.contains(&subjects.tasks_all())
    {
        return Err(SetupError::Mismatch(format!(
            "stream {tasks_name} exists but is not a work-queue stream on {}: \
             delete it (nats stream rm {tasks_name}) or use another --prefix",
            subjects.tasks_all()
        )));
    }

    let dead_name = subjects.stream_dead();
    js.get_or_create_stream(stream::Config {
        name: dead_name.clone(),
        description: Some("dispatcher dead letters: tasks whose attempts are spent".to_owned()),
        subjects: vec![subjects.dead_all()],
        retention: stream::RetentionPolicy::Limits,
        storage: options.storage,
        num_replicas: options.replicas,
        max_age: options.retention,
        ..Default::default()
    })
    .await
    .map_err(|e| other(format!("stream {dead_name}"))(e.into()))?;

    let errors_name = subjects.stream_errors();
    let errors = js
        .get_or_create_stream(stream::Config {
            name: errors_name.clone(),
            description: Some(
                "dispatcher errors: the latest failed attempts, cluster-wide".to_owned(),
            ),
            subjects: vec![subjects.errors_all()],
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            max_messages: options.max_errors.max(1),
            allow_direct: true,
            storage: options.storage,
            num_replicas: options.replicas,
            max_age: options.retention,
            ..Default::default()
        })
        .await
        .map_err(|e| other(format!("stream {errors_name}"))(e.into()))?;

    let records = bucket(&js, subjects.bucket_tasks(), options).await?;
    let cancels = bucket(&js, subjects.bucket_cancels(), options).await?;
    Ok(Durable {
        js,
        tasks,
        records,
        cancels,
        errors,
    })
}

/// Finds or creates a KV bucket. The bucket's stream is created here with
/// the settings async-nats would use, because its `create_key_value` asks
/// for account details that a 2.9 server does not send.
async fn bucket(
    js: &jetstream::Context,
    name: String,
    options: &JetStreamOptions,
) -> Result<kv::Store, SetupError> {
    if let Ok(store) = js.get_key_value(&name).await {
        return Ok(store);
    }
    js.get_or_create_stream(stream::Config {
        name: Subjects::kv_stream(&name),
        description: Some(format!("dispatcher KV bucket {name}")),
        subjects: vec![Subjects::kv_subjects(&name)],
        max_messages_per_subject: 1,
        max_age: options.retention,
        storage: options.storage,
        num_replicas: options.replicas,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        duplicate_window: options.retention.min(std::time::Duration::from_secs(120)),
        ..Default::default()
    })
    .await
    .map_err(|e| other(format!("KV bucket {name}"))(e.into()))?;
    js.get_key_value(&name)
        .await
        .map_err(|e| other(format!("KV bucket {name}"))(e.into()))
}

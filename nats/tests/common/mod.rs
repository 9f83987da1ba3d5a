//! Helpers the NATS integration tests share: every wait has a deadline.
#![allow(dead_code)] // each test crate uses its own share

use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;

/// How long any one wait may take.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Subscribes and flushes, so nothing published afterwards is missed.
pub async fn subscribe(
    client: &async_nats::Client,
    subject: impl Into<String>,
) -> async_nats::Subscriber {
    let sub = client.subscribe(subject.into()).await.unwrap();
    client.flush().await.unwrap();
    sub
}

/// A request with `body` as it is (possibly not JSON); the reply as JSON.
pub async fn request_raw(
    client: &async_nats::Client,
    subject: impl Into<String>,
    body: &[u8],
) -> Value {
    let msg = tokio::time::timeout(
        DEADLINE,
        client.request(subject.into(), body.to_vec().into()),
    )
    .await
    .expect("reply within 10 s")
    .expect("request");
    serde_json::from_slice(&msg.payload).unwrap()
}

/// A JSON request; the reply as JSON.
pub async fn request(
    client: &async_nats::Client,
    subject: impl Into<String>,
    body: Value,
) -> Value {
    request_raw(client, subject, body.to_string().as_bytes()).await
}

/// The next message, as its subject and JSON body.
pub async fn next_json(sub: &mut async_nats::Subscriber) -> (String, Value) {
    let msg = tokio::time::timeout(DEADLINE, sub.next())
        .await
        .expect("message within 10 s")
        .unwrap();
    (
        msg.subject.to_string(),
        serde_json::from_slice(&msg.payload).unwrap(),
    )
}

/// Polls `probe` until it answers `Some`, for at most `deadline`.
pub async fn eventually<T, F, Fut>(deadline: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "condition not met within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

//! A quick throughput probe: keeps `WINDOW` echo tasks in flight through
//! `<p>.submit.echo` requests against a running node and reports tasks per
//! second from submit to `completed` event. Not the benchmark (that is
//! `dispatcher bench`, to come); a number for a quick look.
//!
//! ```sh
//! cargo run --release -- serve --mode core &
//! cargo run --release --example throughput -- nats://127.0.0.1:4222 dispatch 20000 64
//! ```

use std::collections::HashSet;
use std::time::Instant;

use futures::StreamExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let url = args.get(1).map_or("nats://127.0.0.1:4222", String::as_str);
    let prefix = args.get(2).map_or("dispatch", String::as_str);
    let tasks: usize = args.get(3).map_or(Ok(20_000), |s| s.parse())?;
    let window: usize = args.get(4).map_or(Ok(64), |s| s.parse())?;
    let client = async_nats::connect(url).await?;
    let run = format!("tp{}", std::process::id());
    let mut done = client
        .subscribe(format!("{prefix}.events.echo.*.completed"))
        .await?;
    client.flush().await?;
    let payload = format!("\"{}\"", "x".repeat(180));
    let submit = format!("{prefix}.submit.echo");
    let start = Instant::now();
    let mut sent = 0;
    let mut finished = 0;
    let mut seen = HashSet::new();
    let mut replies = futures::stream::FuturesUnordered::new();
    while finished < tasks {
        while sent < tasks && sent - finished < window {
            let body = format!("{{\"id\":\"{run}-{sent}\",\"payload\":{payload}}}");
            let client = client.clone();
            let subject = submit.clone();
            replies.push(async move { client.request(subject, body.into()).await });
            sent += 1;
        }
        tokio::select! {
            Some(reply) = replies.next() => {
                let reply = reply?;
                if !reply.payload.starts_with(b"{\"ok\":true") && !String::from_utf8_lossy(&reply.payload).contains("\"ok\":true") {
                    return Err(format!("refused: {}", String::from_utf8_lossy(&reply.payload)).into());
                }
            }
            Some(msg) = done.next() => {
                let subject = msg.subject.as_str();
                if subject.contains(&run) && seen.insert(subject.to_owned()) {
                    finished += 1;
                }
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{tasks} echo tasks, {window} in flight: {:.0} tasks/s ({secs:.2} s)",
        tasks as f64 / secs
    );
    Ok(())
}

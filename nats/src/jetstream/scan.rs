//! Reads a stream backwards by sequence, newest first, a page at a time.
//!
//! A stream's sequences only grow, so "newest first" is "highest sequence
//! first", and a page is found by asking for sequences one below the other
//! (a direct get, `$JS.API.DIRECT.GET.<stream>`, where the stream allows
//! it, else `$JS.API.STREAM.MSG.GET.<stream>`; a few hundred requests in
//! flight), starting at a
//! cursor, until the page is full or a budget of sequences is spent. A
//! sequence with no message any more (superseded by a newer revision of the
//! same KV key, deleted, expired) is skipped. The cost of a page is
//! proportional to the page and to the gaps it crosses, never to the size of
//! the stream; the cursor to go on from is a sequence, so nothing is ever cut
//! off silently: a page that stops early says where to go on.

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{DirectGetErrorKind, LastRawMessageErrorKind, Stream};
use futures::StreamExt;

/// Requests in flight while a page is read.
const IN_FLIGHT: usize = 256;

/// One page read backwards.
#[derive(Debug)]
pub struct Page<T> {
    /// What was kept, newest first.
    pub items: Vec<T>,
    /// The sequence to go on from (read next, downwards), or `None` when
    /// the stream's first message was reached.
    pub next: Option<u64>,
}

/// Why a page could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The stream's state could not be read.
    #[error("reading stream {stream}: {source}")]
    Info {
        /// The stream.
        stream: String,
        /// What failed.
        #[source]
        source: async_nats::Error,
    },
    /// A message could not be read (other than a gap).
    #[error("reading stream {stream} at sequence {sequence}: {source}")]
    Get {
        /// The stream.
        stream: String,
        /// The sequence.
        sequence: u64,
        /// What failed.
        #[source]
        source: async_nats::Error,
    },
}

/// Reads `stream` from sequence `from` (its last sequence if `None`)
/// downwards, handing each message to `keep`, until `want` items were kept
/// or `budget` sequences were read.
pub async fn backwards<T>(
    stream: &Stream,
    from: Option<u64>,
    want: usize,
    budget: u64,
    mut keep: impl FnMut(&StreamMessage) -> Option<T>,
) -> Result<Page<T>, ScanError> {
    let name = stream.cached_info().config.name.clone();
    let info = stream.get_info().await.map_err(|e| ScanError::Info {
        stream: name.clone(),
        source: e.into(),
    })?;
    let (first, last) = (info.state.first_sequence.max(1), info.state.last_sequence);
    let top = from.unwrap_or(last).min(last);
    if top < first || want == 0 {
        return Ok(Page {
            items: Vec::new(),
            next: None,
        });
    }
    let bottom = top.saturating_sub(budget.max(1) - 1).max(first);
    let direct = info.config.allow_direct;
    let mut gets = futures::stream::iter((bottom..=top).rev())
        .map(|sequence| async move { (sequence, get(stream, sequence, direct).await) })
        .buffered(IN_FLIGHT);
    let mut items = Vec::new();
    let mut lowest_read = top + 1;
    while let Some((sequence, got)) = gets.next().await {
        lowest_read = sequence;
        match got {
            Ok(Some(message)) => {
                if let Some(item) = keep(&message) {
                    items.push(item);
                    if items.len() == want {
                        break;
                    }
                }
            }
            Ok(None) => {}
            Err(source) => {
                return Err(ScanError::Get {
                    stream: name,
                    sequence,
                    source,
                })
            }
        }
    }
    let next = (lowest_read > first).then(|| lowest_read - 1);
    Ok(Page { items, next })
}

/// The message at `sequence`, `None` for a gap.
async fn get(
    stream: &Stream,
    sequence: u64,
    direct: bool,
) -> Result<Option<StreamMessage>, async_nats::Error> {
    if direct {
        match stream.direct_get(sequence).await {
            Ok(message) => Ok(Some(message)),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    } else {
        match stream.get_raw_message(sequence).await {
            Ok(message) => Ok(Some(message)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

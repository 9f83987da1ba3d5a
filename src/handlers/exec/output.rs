//! Bounded reading of a program's output. [`LineReader`] splits stdout
//! into lines without ever holding more than `max_line` bytes of one:
//! a longer line is discarded as it streams past, up to its newline, and
//! counted; a line that is not UTF-8 is skipped and counted, and the lines
//! after it are read as usual. Past `max_output` bytes in all it stops
//! parsing but keeps reading (and dropping) until EOF, so the program is
//! never blocked on a full pipe. [`Tail`] keeps the last bytes of stderr,
//! however much is written.

use std::collections::VecDeque;
use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};
use tracing::warn;

/// Bytes read from a pipe at once.
const CHUNK: usize = 64 * 1024;

/// How much of a program's stdout is parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutputLimits {
    /// Longest line kept, in bytes (without its newline).
    pub max_line: usize,
    /// Bytes of stdout parsed in all; the rest is read and dropped.
    pub max_output: u64,
}

/// What a [`LineReader`] skipped or dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LineStats {
    /// Lines longer than `max_line`, dropped.
    pub long_lines: u64,
    /// Lines that were not UTF-8, skipped.
    pub invalid_utf8: u64,
    /// Bytes read within `max_output`.
    pub bytes_read: u64,
    /// Bytes read past `max_output`, dropped.
    pub bytes_dropped: u64,
}

impl LineStats {
    /// True if any line or byte was lost.
    pub fn lost_any(&self) -> bool {
        self.long_lines > 0 || self.invalid_utf8 > 0 || self.bytes_dropped > 0
    }
}

/// Splits a pipe into bounded UTF-8 lines.
pub struct LineReader<R> {
    inner: R,
    limits: OutputLimits,
    chunk: Box<[u8]>,
    /// The unread part of `chunk` is `chunk[start..end]`.
    start: usize,
    end: usize,
    /// The line read so far, at most `max_line` bytes.
    line: Vec<u8>,
    /// Inside a line already too long: drop bytes up to the next newline.
    discarding: bool,
    eof: bool,
    stats: LineStats,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    /// A reader of `inner` within `limits`.
    pub fn new(inner: R, limits: OutputLimits) -> Self {
        Self {
            inner,
            limits,
            chunk: vec![0; CHUNK].into_boxed_slice(),
            start: 0,
            end: 0,
            line: Vec::new(),
            discarding: false,
            eof: false,
            stats: LineStats::default(),
        }
    }

    /// What was skipped or dropped so far.
    pub fn stats(&self) -> LineStats {
        self.stats
    }

    /// The next line that is within `max_line` and valid UTF-8 (without
    /// its `\n` or `\r\n`), or `None` at EOF. Once `max_output` bytes
    /// have been read, drains the pipe to EOF and returns `None`.
    /// Cancel safe: dropping the future loses no line that was read.
    pub async fn next_line(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(line) = self.take_line() {
                return Ok(Some(line));
            }
            if self.eof {
                return Ok(self.take_last_line());
            }
            let budget = self.limits.max_output.saturating_sub(self.stats.bytes_read);
            if budget == 0 {
                self.drain().await?;
                return Ok(None);
            }
            let want = self
                .chunk
                .len()
                .min(usize::try_from(budget).unwrap_or(usize::MAX));
            let n = self.inner.read(&mut self.chunk[..want]).await?;
            if n == 0 {
                self.eof = true;
            } else {
                self.stats.bytes_read += n as u64;
                self.start = 0;
                self.end = n;
            }
        }
    }

    /// Consumes buffered bytes up to the next complete line worth keeping.
    fn take_line(&mut self) -> Option<String> {
        while self.start < self.end {
            let unread = &self.chunk[self.start..self.end];
            match unread.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    let fits = self.line.len() + i <= self.limits.max_line;
                    if !self.discarding && fits {
                        self.line.extend_from_slice(&unread[..i]);
                    } else if !self.discarding {
                        self.count_long_line();
                    }
                    self.start += i + 1;
                    let was_discarding = std::mem::replace(&mut self.discarding, false);
                    if was_discarding || !fits {
                        self.line.clear();
                        continue;
                    }
                    if let Some(line) = self.finish_line() {
                        return Some(line);
                    }
                }
                None => {
                    if !self.discarding {
                        if self.line.len() + unread.len() <= self.limits.max_line {
                            self.line.extend_from_slice(unread);
                        } else {
                            self.count_long_line();
                            self.discarding = true;
                            self.line.clear();
                        }
                    }
                    self.start = self.end;
                }
            }
        }
        None
    }

    /// The last line when it has no newline.
    fn take_last_line(&mut self) -> Option<String> {
        if self.discarding || self.line.is_empty() {
            self.discarding = false;
            self.line.clear();
            return None;
        }
        self.finish_line()
    }

    /// Turns the collected bytes into a line, or counts them as not UTF-8.
    fn finish_line(&mut self) -> Option<String> {
        if self.line.last() == Some(&b'\r') {
            self.line.pop();
        }
        let bytes = std::mem::take(&mut self.line);
        match String::from_utf8(bytes) {
            Ok(line) => Some(line),
            Err(e) => {
                self.stats.invalid_utf8 += 1;
                if self.stats.invalid_utf8 == 1 {
                    warn!(error = %e.utf8_error(), "exec: skipped a stdout line that is not UTF-8 (later ones are counted).");
                }
                // Keep the allocation for the next line.
                self.line = e.into_bytes();
                self.line.clear();
                None
            }
        }
    }

    fn count_long_line(&mut self) {
        self.stats.long_lines += 1;
        if self.stats.long_lines == 1 {
            warn!(
                max_line = self.limits.max_line,
                "exec: dropped a stdout line longer than the limit (later ones are counted)."
            );
        }
    }

    /// Reads and drops the rest of the pipe, past `max_output`.
    async fn drain(&mut self) -> io::Result<()> {
        // What is buffered was read within the limit: only an unfinished
        // line, lost with the rest.
        self.start = self.end;
        self.line = Vec::new();
        let mut warned = false;
        loop {
            let n = self.inner.read(&mut self.chunk).await?;
            if n == 0 {
                self.eof = true;
                return Ok(());
            }
            self.stats.bytes_dropped += n as u64;
            if !warned {
                warned = true;
                warn!(
                    max_output = self.limits.max_output,
                    "exec: stdout passed the output limit; the rest is read and dropped."
                );
            }
        }
    }
}

/// The last `capacity` bytes written to a pipe.
#[derive(Debug)]
pub struct Tail {
    bytes: VecDeque<u8>,
    capacity: usize,
    total: u64,
}

impl Tail {
    /// An empty tail keeping at most `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self {
            bytes: VecDeque::with_capacity(capacity),
            capacity,
            total: 0,
        }
    }

    /// Adds `data`, forgetting what falls out of the window.
    pub fn push(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        let keep = &data[data.len().saturating_sub(self.capacity)..];
        let overflow = (self.bytes.len() + keep.len()).saturating_sub(self.capacity);
        self.bytes.drain(..overflow);
        self.bytes.extend(keep);
    }

    /// Reads `pipe` to EOF into the tail. Cancel safe: what was read is kept.
    pub async fn read_from<R: AsyncRead + Unpin>(&mut self, mut pipe: R) -> io::Result<()> {
        let mut chunk = vec![0; CHUNK];
        loop {
            let n = pipe.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            self.push(&chunk[..n]);
        }
    }

    /// The kept bytes as text (invalid UTF-8 replaced); starts with `…`
    /// when earlier bytes were forgotten, and never with half a character.
    pub fn to_text(&self) -> String {
        let (a, b) = self.bytes.as_slices();
        let mut bytes = Vec::with_capacity(a.len() + b.len());
        bytes.extend_from_slice(a);
        bytes.extend_from_slice(b);
        if self.total > self.bytes.len() as u64 {
            // Skip the continuation bytes of a character cut at the start.
            let cut = bytes
                .iter()
                .take(3)
                .take_while(|&&b| b & 0xC0 == 0x80)
                .count();
            format!("…{}", String::from_utf8_lossy(&bytes[cut..]))
        } else {
            String::from_utf8_lossy(&bytes).into_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::ReadBuf;

    use super::*;

    const LIMITS: OutputLimits = OutputLimits {
        max_line: 16,
        max_output: 1 << 20,
    };

    async fn lines(input: &[u8], limits: OutputLimits) -> (Vec<String>, LineStats) {
        let mut reader = LineReader::new(input, limits);
        let mut out = Vec::new();
        while let Some(line) = reader.next_line().await.unwrap() {
            out.push(line);
        }
        (out, reader.stats())
    }

    #[tokio::test]
    async fn splits_lines_and_keeps_the_last_one_without_newline() {
        let (out, stats) = lines(b"a\r\n\nbc\nlast", LIMITS).await;
        assert_eq!(out, ["a", "", "bc", "last"]);
        assert!(!stats.lost_any());
        assert_eq!(stats.bytes_read, 11);
    }

    #[tokio::test]
    async fn an_over_long_line_is_dropped_and_counted_and_the_next_is_kept() {
        let long = "x".repeat(17);
        let input = format!(
            "ok\n{long}\n{}\n{long}{long}\n{{\"result\":1}}\n{long}",
            "y".repeat(16)
        );
        let (out, stats) = lines(input.as_bytes(), LIMITS).await;
        assert_eq!(out, ["ok", &"y".repeat(16), "{\"result\":1}"]);
        assert_eq!(stats.long_lines, 3);
    }

    #[tokio::test]
    async fn a_line_cut_over_many_chunks_is_dropped_and_the_next_is_kept() {
        let limits = OutputLimits {
            max_line: 1000,
            max_output: 1 << 30,
        };
        let mut input = vec![b'z'; 3 * CHUNK + 5];
        input.extend_from_slice(b"\n{\"result\":2}\n");
        let (out, stats) = lines(&input, limits).await;
        assert_eq!(out, ["{\"result\":2}"]);
        assert_eq!(stats.long_lines, 1);
    }

    #[tokio::test]
    async fn invalid_utf8_is_skipped_without_losing_later_lines() {
        let input = b"{\"progress\":1}\n\xff\xfe bad \xc3\n{\"result\":\"r\"}\n";
        let (out, stats) = lines(input, LIMITS).await;
        assert_eq!(out, ["{\"progress\":1}", "{\"result\":\"r\"}"]);
        assert_eq!(stats.invalid_utf8, 1);
    }

    /// `remaining` bytes of `byte`, never a newline, made on the fly.
    struct Generator {
        remaining: u64,
    }

    impl AsyncRead for Generator {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = (buf.remaining() as u64).min(self.remaining) as usize;
            buf.initialize_unfilled_to(n).fill(b'a');
            buf.advance(n);
            self.remaining -= n as u64;
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_huge_output_without_newline_is_read_through_in_bounded_memory() {
        const TOTAL: u64 = 256 << 20;
        let limits = OutputLimits {
            max_line: 1 << 20,
            max_output: 64 << 20,
        };
        let mut reader = LineReader::new(Generator { remaining: TOTAL }, limits);
        assert_eq!(reader.next_line().await.unwrap(), None);
        let stats = reader.stats();
        assert_eq!(stats.bytes_read, 64 << 20);
        assert_eq!(stats.bytes_read + stats.bytes_dropped, TOTAL);
        assert_eq!(stats.long_lines, 1);
        // Never more than one line's worth held (plus the growth slack of a Vec).
        assert!(
            reader.line.capacity() <= 2 << 20,
            "{}",
            reader.line.capacity()
        );

        // Without the total limit too: the line is dropped as it streams past.
        let limits = OutputLimits {
            max_line: 1 << 20,
            max_output: u64::MAX,
        };
        let mut reader = LineReader::new(Generator { remaining: TOTAL }, limits);
        assert_eq!(reader.next_line().await.unwrap(), None);
        assert_eq!(reader.stats().bytes_read, TOTAL);
        assert_eq!(reader.stats().long_lines, 1);
        assert!(reader.line.capacity() <= 2 << 20);
    }

    #[tokio::test]
    async fn past_the_output_limit_lines_are_dropped_but_the_pipe_is_drained() {
        let limits = OutputLimits {
            max_line: 16,
            max_output: 4,
        };
        let (out, stats) = lines(b"ab\ncd\nef\n", limits).await;
        assert_eq!(out, ["ab"]);
        assert_eq!(stats.bytes_read, 4);
        assert_eq!(stats.bytes_dropped, 5);
    }

    #[tokio::test]
    async fn the_tail_is_the_end_of_stderr_however_long() {
        let mut tail = Tail::new(8);
        tail.push(b"0123");
        assert_eq!(tail.to_text(), "0123");
        tail.push(b"456789");
        assert_eq!(tail.to_text(), "…23456789");
        tail.push(&[b'x'; 100]);
        tail.push(b"end");
        assert_eq!(tail.to_text(), "…xxxxxend");
        assert_eq!(tail.total, 113);

        // Read from a pipe: 3 MiB of noise, then the words that matter.
        let mut long = vec![b'n'; 3 << 20];
        long.extend_from_slice("the real error: é".as_bytes());
        let mut tail = Tail::new(20);
        tail.read_from(&long[..]).await.unwrap();
        assert_eq!(tail.to_text(), "…nnthe real error: é");
        // A character cut at the start is not shown as garbage.
        let mut tail = Tail::new(3);
        tail.push("aéé".as_bytes());
        assert_eq!(tail.to_text(), "…é");
    }
}

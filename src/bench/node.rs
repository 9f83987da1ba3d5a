//! The measured node: `dispatcher serve` as a child process, ready once it
//! publishes `online`, stopped with SIGTERM (killed on drop), and its CPU
//! time and peak resident set read from `/proc`.

use std::collections::VecDeque;
use std::io::BufRead as _;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use dispatcher_actors::NodeEventName;
use dispatcher_nats::{Mode, Subjects};
use futures::StreamExt;

use super::{START_DEADLINE, STOP_DEADLINE};

/// Lines of a node's log kept to explain its failure.
const LOG_TAIL: usize = 20;

/// A `dispatcher serve` child process, stopped with SIGTERM (killed on drop).
pub(super) struct NodeProcess {
    child: Child,
    mode: Mode,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl NodeProcess {
    /// Starts the node `<prefix>-<name>` and waits for its `online` event.
    pub(super) async fn start(
        client: &async_nats::Client,
        url: &str,
        subjects: &Subjects,
        mode: Mode,
        workers: u64,
        name: &str,
    ) -> anyhow::Result<Self> {
        let node_id = format!("{}-{name}", subjects.prefix());
        let mut online = client
            .subscribe(subjects.node_event(&node_id, NodeEventName::Online))
            .await?;
        client.flush().await?;
        let exe = std::env::current_exe().context("locating the dispatcher binary")?;
        let mut command = Command::new(&exe);
        // The measured node runs with its defaults and the flags below: no
        // DISPATCH_* variable (a configuration file, per-task debug logs)
        // of this shell reaches it.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("DISPATCH_") {
                command.env_remove(name);
            }
        }
        // The URL (it may carry a password) goes in the environment, out
        // of the process list.
        let mut child = command
            .env("DISPATCH_NATS_URL", url)
            .args(["serve", "--mode", mode.as_str(), "--workers"])
            .arg(workers.to_string())
            .args(["--prefix", subjects.prefix(), "--node-id", &node_id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} serve", exe.display()))?;
        let log = Arc::new(Mutex::new(VecDeque::with_capacity(LOG_TAIL)));
        if let Some(stderr) = child.stderr.take() {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stderr)
                    .lines()
                    .map_while(Result::ok)
                {
                    if let Ok(mut log) = log.lock() {
                        if log.len() == LOG_TAIL {
                            log.pop_front();
                        }
                        log.push_back(line);
                    }
                }
            });
        }
        let mut node = Self { child, mode, log };
        let deadline = tokio::time::sleep(START_DEADLINE);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                msg = online.next() => {
                    msg.ok_or_else(|| anyhow!("the NATS connection closed"))?;
                    return Ok(node);
                }
                _ = tick.tick() => node.check()?,
                _ = &mut deadline => bail!(
                    "the {} node did not come online within {START_DEADLINE:?}{}",
                    mode.as_str(),
                    node.log_tail()
                ),
            }
        }
    }

    pub(super) fn check(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => bail!(
                "the {} node exited ({status}){}",
                self.mode.as_str(),
                self.log_tail()
            ),
        }
    }

    /// CPU time (user + system) so far, in clock ticks.
    pub(super) fn cpu_ticks(&self) -> Option<u64> {
        cpu_ticks(&format!("/proc/{}/stat", self.child.id()))
    }

    /// Resident set now (VmRSS), in KiB.
    pub(super) fn rss_kib(&self) -> Option<u64> {
        status_kib(self.child.id(), "VmRSS:")
    }

    /// Peak resident set so far (VmHWM), in KiB.
    pub(super) fn peak_rss_kib(&self) -> Option<u64> {
        peak_rss_kib(self.child.id())
    }

    fn log_tail(&self) -> String {
        let lines: Vec<String> = self
            .log
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default();
        if lines.is_empty() {
            String::new()
        } else {
            format!("; the end of its log:\n{}", lines.join("\n"))
        }
    }

    /// SIGTERM, then waits for a graceful exit.
    pub(super) async fn stop(&mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_none() {
            let pid = self.child.id().to_string();
            let sent = Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .is_ok_and(|s| s.success());
            if !sent {
                let _ = self.child.kill();
            }
        }
        let deadline = Instant::now() + STOP_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!(
                        "the node exited with {status} on SIGTERM{}",
                        self.log_tail()
                    );
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("the node did not stop within {STOP_DEADLINE:?} of SIGTERM; killed it");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// utime + stime of `/proc/…/stat`, in clock ticks.
pub(super) fn cpu_ticks(path: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces), from field 3.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some(utime + stime)
}

/// VmHWM of `/proc/<pid>/status`, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// A `… kB` line of `/proc/<pid>/status`.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `getconf CLK_TCK` (100 on Linux).
pub(super) fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_figures_of_this_process() {
        assert!(cpu_ticks("/proc/self/stat").is_some());
        assert!(peak_rss_kib(std::process::id()).is_some_and(|k| k > 0));
        assert!(clock_ticks() > 0);
    }
}

//! The processes of one `exec` run, and how they are stopped.
//!
//! The program leads a process group of its own, and every run carries a
//! variable of its own, `DISPATCH_EXEC_RUN=<uuid>`, that its descendants
//! inherit. A member of the run is a live (not zombie) process that is in
//! the group, or whose `/proc/<pid>/environ` holds the tag: so a
//! descendant that left the group (`setsid`, `setpgid`) is still found.
//! [`RunProcesses::stop`] sends SIGTERM to all of them, SIGKILL after the
//! grace to whatever is left (again and again, so a process forking
//! meanwhile is caught too), and returns once none is left.
//!
//! Finding the members reads `/proc/<pid>/stat` (and `environ` where the
//! group does not match) of every process, a few milliseconds on a host
//! with hundreds; it happens only when a run ends.
//!
//! The limits: a descendant that both leaves the group and clears or
//! rewrites its environment before exec cannot be told from any other
//! process of the node's user, and escapes; and a node that is itself
//! killed (SIGKILL) stops nothing. A cgroup (a systemd unit per node with
//! `KillMode=control-group`, or a container) is the hard boundary. The
//! node is not made a child subreaper: orphans would then be its children,
//! to be reaped with `waitpid(-1)`, which would race tokio's reaping of
//! the programs themselves.

use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::time::Instant;
use tracing::{debug, error};

/// The variable that tags a run's processes.
pub const RUN_VAR: &str = "DISPATCH_EXEC_RUN";

/// How long processes may take to vanish after SIGKILL before we give up
/// on them (a process stuck in the kernel, state D, ignores even that).
const KILL_WAIT: Duration = Duration::from_secs(5);
/// First and longest pause between two looks at `/proc`.
const POLL_FIRST: Duration = Duration::from_millis(2);
const POLL_MAX: Duration = Duration::from_millis(50);

/// How a stop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// No member is left.
    Gone,
    /// These survived SIGKILL for [`KILL_WAIT`].
    Stuck(Vec<i32>),
}

/// The processes of one run: its group and its tag. Dropped while armed
/// (the attempt's future dropped half-way), it SIGKILLs what is left.
#[derive(Debug)]
pub struct RunProcesses {
    pgid: Pid,
    /// `DISPATCH_EXEC_RUN=<id>`, as it appears in `/proc/<pid>/environ`.
    tag: Vec<u8>,
    own: i32,
    armed: bool,
}

impl RunProcesses {
    /// The run whose program is `leader` (the leader of its group) and
    /// whose tag value is `run_id`.
    pub fn new(leader: u32, run_id: &str) -> Self {
        Self {
            pgid: Pid::from_raw(i32::try_from(leader).unwrap_or(i32::MAX)),
            tag: format!("{RUN_VAR}={run_id}").into_bytes(),
            own: std::process::id() as i32,
            armed: true,
        }
    }

    /// The live members of the run, by pid.
    pub fn members(&self) -> Vec<i32> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| pid != self.own && self.is_member(pid))
            .collect()
    }

    fn is_member(&self, pid: i32) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        let Some((state, pgrp)) = parse_stat(&stat) else {
            return false;
        };
        if matches!(state, 'Z' | 'X' | 'x') {
            return false;
        }
        if pgrp == self.pgid.as_raw() {
            return true;
        }
        // Unreadable (another user's process, or gone): not ours.
        std::fs::read(format!("/proc/{pid}/environ"))
            .map(|environ| environ.split(|&b| b == 0).any(|var| var == self.tag))
            .unwrap_or(false)
    }

    /// Sends `signal` to the group and to every member; returns how many
    /// members there were.
    pub fn signal(&self, signal: Signal) -> usize {
        let members = self.members();
        self.send(signal, &members);
        members.len()
    }

    fn send(&self, signal: Signal, members: &[i32]) {
        match killpg(self.pgid, signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => debug!(error = %e, "exec: signalling the group failed."),
        }
        for &pid in members {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    /// SIGTERM to every member, SIGKILL after `grace` to whatever is
    /// left; returns once no member is left (or some survive even
    /// SIGKILL). Reaps `leader`, the program itself.
    pub async fn stop(&mut self, leader: &mut Child, grace: Duration) -> Stopped {
        let _ = leader.try_wait();
        if self.signal(Signal::SIGTERM) > 0
            && !self.wait_gone(leader, Instant::now() + grace, None).await
            && !self
                .wait_gone(leader, Instant::now() + KILL_WAIT, Some(Signal::SIGKILL))
                .await
        {
            let left = self.members();
            error!(pids = ?left, "exec: processes of the run survived SIGKILL.");
            return Stopped::Stuck(left);
        }
        // Reap the leader if it has not been yet (killed, it goes at once).
        let _ = tokio::time::timeout(KILL_WAIT, leader.wait()).await;
        self.armed = false;
        Stopped::Gone
    }

    /// Waits until no member is left or `until`; sends `resend` to the
    /// members at every look.
    async fn wait_gone(&self, leader: &mut Child, until: Instant, resend: Option<Signal>) -> bool {
        let mut pause = POLL_FIRST;
        loop {
            let _ = leader.try_wait();
            let members = self.members();
            if members.is_empty() {
                return true;
            }
            if let Some(signal) = resend {
                self.send(signal, &members);
            }
            let now = Instant::now();
            if now >= until {
                return false;
            }
            tokio::time::sleep(pause.min(until - now)).await;
            pause = (pause * 2).min(POLL_MAX);
        }
    }
}

impl Drop for RunProcesses {
    fn drop(&mut self) {
        if self.armed {
            let n = self.signal(Signal::SIGKILL);
            debug!(
                members = n,
                "exec: the attempt was dropped; killed what was left of its run."
            );
        }
    }
}

/// `(state, pgrp)` from `/proc/<pid>/stat`: `pid (comm) state ppid pgrp …`,
/// where `comm` may hold spaces and parentheses.
fn parse_stat(stat: &str) -> Option<(char, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_whatever_the_command_name() {
        assert_eq!(
            parse_stat("42 (sh) S 1 42 42 0 -1 4194560 …"),
            Some(('S', 42))
        );
        assert_eq!(parse_stat("7 (a) b) (c) Z 3 9 9 0"), Some(('Z', 9)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[tokio::test]
    async fn stop_ends_the_group_and_tagged_processes_that_ignore_sigterm() {
        let run_id = uuid::Uuid::now_v7().simple().to_string();
        // A member of the group and one that left it with setsid, both
        // ignoring SIGTERM; the leader waits for them.
        let script = "trap '' TERM; sleep 600 & setsid sh -c \"trap '' TERM; sleep 600\" & \
                      echo ready; wait";
        let mut leader = tokio::process::Command::new("/bin/sh")
            .args(["-c", script])
            .env(RUN_VAR, &run_id)
            .process_group(0)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut run = RunProcesses::new(leader.id().unwrap(), &run_id);
        // Wait until they run: the leader, its sleep, and one that left the group.
        let left_group = |run: &RunProcesses| {
            run.members()
                .into_iter()
                .filter(|pid| {
                    let stat =
                        std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                    parse_stat(&stat).is_some_and(|(_, pgrp)| pgrp != run.pgid.as_raw())
                })
                .count()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while run.members().len() < 3 || left_group(&run) == 0 {
            assert!(Instant::now() < deadline, "{:?}", run.members());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let stopped = run.stop(&mut leader, Duration::from_millis(50)).await;
        assert_eq!(stopped, Stopped::Gone);
        assert!(run.members().is_empty());
        assert!(leader.try_wait().unwrap().is_some());
    }
}

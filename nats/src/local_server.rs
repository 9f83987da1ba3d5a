//! [`LocalServer`]: a private `nats-server` with JetStream, on a free
//! loopback port with its own store directory, stopped and removed on drop.
//! Integration tests and `dispatcher demo` use it; it never touches a
//! server already running on the machine.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a started server may take to accept connections.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// Ports tried before giving up when another process takes ours first.
const PORT_ATTEMPTS: usize = 5;

/// Why a private server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LocalServerError {
    /// No `nats-server` binary was found.
    #[error(
        "nats-server not found (looked at $NATS_SERVER_BIN, the PATH and /usr/sbin): \
         install it with `sudo apt-get install nats-server`, or set NATS_SERVER_BIN"
    )]
    NotInstalled,
    /// Starting or talking to the process failed.
    #[error("starting nats-server: {0}")]
    Io(#[from] std::io::Error),
    /// The server never accepted connections.
    #[error("nats-server did not accept connections on port {port} within {START_DEADLINE:?}")]
    NotReady {
        /// The port it was given.
        port: u16,
    },
}

/// A running private `nats-server`; killed, and its store removed, on drop.
#[derive(Debug)]
pub struct LocalServer {
    child: Child,
    port: u16,
    binary: PathBuf,
    store: TempDir,
}

impl LocalServer {
    /// Starts a server with JetStream on a free port of 127.0.0.1 and waits
    /// until it accepts connections.
    pub fn start() -> Result<Self, LocalServerError> {
        let binary = find_binary().ok_or(LocalServerError::NotInstalled)?;
        let store = TempDir::new()?;
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            let mut child = spawn(&binary, port, &store)?;
            match wait_ready(&mut child, port) {
                Ok(()) => {
                    return Ok(Self {
                        child,
                        port,
                        binary,
                        store,
                    })
                }
                // Someone took the port between our probe and the start.
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(LocalServerError::NotReady { port: 0 }))
    }

    /// `nats://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server and starts it again on the same port with the same
    /// store (what was stored in JetStream survives).
    pub fn restart(&mut self) -> Result<(), LocalServerError> {
        self.kill();
        self.child = spawn(&self.binary, self.port, &self.store)?;
        wait_ready(&mut self.child, self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `port` accepts connections; kills `child` if it never does.
fn wait_ready(child: &mut Child, port: u16) -> Result<(), LocalServerError> {
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if child.try_wait()?.is_some() || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(LocalServerError::NotReady { port });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn(binary: &PathBuf, port: u16, store: &TempDir) -> std::io::Result<Child> {
    Command::new(binary)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn find_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return Some(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("nats-server"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let sbin = PathBuf::from("/usr/sbin/nats-server");
        sbin.is_file().then_some(sbin)
    })
}

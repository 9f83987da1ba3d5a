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
    /// Arguments after the common ones (cluster settings of a member).
    extra: Vec<String>,
}

impl LocalServer {
    /// Starts a server with JetStream on a free port of 127.0.0.1 and waits
    /// until it accepts connections.
    pub fn start() -> Result<Self, LocalServerError> {
        Self::start_with(&[])
    }

    /// As [`LocalServer::start`], with more `nats-server` arguments, kept
    /// for [`LocalServer::restart`]: a login the clients must give
    /// (`["--user", "ops", "--pass", "s3cret"]`, `["--auth", "TOKEN"]`),
    /// for example.
    pub fn start_with(args: &[&str]) -> Result<Self, LocalServerError> {
        let binary = find_binary().ok_or(LocalServerError::NotInstalled)?;
        let store = TempDir::new()?;
        let extra: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            let mut child = spawn(&binary, port, &store, &extra)?;
            match wait_ready(&mut child, port, &extra) {
                Ok(()) => {
                    return Ok(Self {
                        child,
                        port,
                        binary,
                        store,
                        extra,
                    })
                }
                // Someone took the port between our probe and the start.
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(LocalServerError::NotReady { port: 0 }))
    }

    /// Starts `n` servers (at least 3, what JetStream clustering needs) that
    /// form one JetStream cluster on loopback: each with its own port, store
    /// directory and server name (`s1`, `s2`, …), routes to all the others,
    /// and one cluster name. Returns once every one accepts connections;
    /// JetStream may still be electing its meta leader then (a few seconds),
    /// so callers wait until `$JS.API.INFO` answers before relying on it.
    /// Each member restarts with [`LocalServer::restart`] into the cluster.
    pub fn cluster(n: usize) -> Result<Vec<Self>, LocalServerError> {
        if n < 3 {
            return Err(LocalServerError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a JetStream cluster needs at least 3 servers, not {n}"),
            )));
        }
        let binary = find_binary().ok_or(LocalServerError::NotInstalled)?;
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            match start_cluster(&binary, n) {
                Ok(servers) => return Ok(servers),
                // Someone took one of the ports between our probe and the start.
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
        self.child = spawn(&self.binary, self.port, &self.store, &self.extra)?;
        wait_ready(&mut self.child, self.port, &self.extra)
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

/// One attempt at [`LocalServer::cluster`]: `n` client ports and `n`
/// route ports, all distinct, then every member started before any is
/// waited for (a member only settles once its routes connect).
fn start_cluster(binary: &PathBuf, n: usize) -> Result<Vec<LocalServer>, LocalServerError> {
    let ports = free_ports(2 * n)?;
    let (clients, routes) = ports.split_at(n);
    let name = format!("dispatch-test-{}", clients[0]);
    let mut servers = Vec::with_capacity(n);
    for (i, (&port, &route)) in clients.iter().zip(routes).enumerate() {
        let others: Vec<String> = routes
            .iter()
            .filter(|&&r| r != route)
            .map(|r| format!("nats://127.0.0.1:{r}"))
            .collect();
        let extra = vec![
            "-n".to_owned(),
            format!("s{}", i + 1),
            "--cluster_name".to_owned(),
            name.clone(),
            "--cluster".to_owned(),
            format!("nats://127.0.0.1:{route}"),
            "--routes".to_owned(),
            others.join(","),
        ];
        let store = TempDir::new()?;
        let child = spawn(binary, port, &store, &extra)?;
        // Pushed at once so a failure below stops those already started.
        servers.push(LocalServer {
            child,
            port,
            binary: binary.clone(),
            store,
            extra,
        });
    }
    for server in &mut servers {
        wait_ready(&mut server.child, server.port, &server.extra)?;
    }
    Ok(servers)
}

/// `count` distinct free ports: all probed while the others are held.
fn free_ports(count: usize) -> std::io::Result<Vec<u16>> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// Waits until `port` accepts connections from this very server (its INFO
/// names it: another test's server may have taken the port first); kills
/// `child` if it never does.
fn wait_ready(child: &mut Child, port: u16, extra: &[String]) -> Result<(), LocalServerError> {
    let deadline = Instant::now() + START_DEADLINE;
    let name = server_name(child, extra);
    loop {
        if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) {
            if serves(stream, &name) {
                return Ok(());
            }
        }
        if child.try_wait()?.is_some() || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(LocalServerError::NotReady { port });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The name a spawned server was given: `-n` of `extra`, else its pid's.
fn server_name(child: &Child, extra: &[String]) -> String {
    extra
        .iter()
        .position(|a| a == "-n")
        .and_then(|i| extra.get(i + 1))
        .cloned()
        .unwrap_or_else(|| format!("local-{}", child.id()))
}

/// Whether the server behind `stream` says it is `name`.
fn serves(stream: TcpStream, name: &str) -> bool {
    use std::io::BufRead as _;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    if std::io::BufReader::new(stream)
        .read_line(&mut line)
        .is_err()
    {
        return false;
    }
    line.contains(&format!("\"server_name\":\"{name}\""))
}

fn spawn(binary: &PathBuf, port: u16, store: &TempDir, extra: &[String]) -> std::io::Result<Child> {
    // Named after its own pid (see `wait_ready`), unless `extra` names it.
    let named = extra.iter().any(|a| a == "-n");
    let mut command = Command::new(binary);
    command
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store.path())
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if named {
        return command.spawn();
    }
    // The pid is known only after the spawn: a wrapper shell execs the
    // server with its own pid as the name.
    let mut args = vec![binary.display().to_string()];
    args.extend(["-a", "127.0.0.1", "-p"].map(str::to_owned));
    args.push(port.to_string());
    args.extend(["-js", "-sd"].map(str::to_owned));
    args.push(store.path().display().to_string());
    args.extend(extra.iter().cloned());
    Command::new("sh")
        .arg("-c")
        .arg("exec \"$@\" -n \"local-$$\"")
        .arg("sh")
        .args(args)
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

//! [`LocalServer`]: a private `nats-server` with JetStream, on a free
//! loopback port with its own store directory, stopped and removed on drop.
//! Integration tests and `dispatcher demo` use it; it never touches a
//! server already running on the machine. [`LocalServer::start_with_config`]
//! runs it with a configuration file (accounts, users, permissions), still on
//! its own port and store: the command-line flags win over the file.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a started server may take to accept connections.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// Ports tried before giving up when another process takes ours first.
const PORT_ATTEMPTS: usize = 5;
/// Where [`LocalServer::start_with_config`] writes the configuration, in
/// the store directory.
const CONFIG_FILE: &str = "nats-server.conf";
/// Where a server started with a configuration logs, in the store directory.
const LOG_FILE: &str = "nats-server.log";

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
    /// The configuration file was refused (`nats-server -t` says why).
    #[error("nats-server refused the configuration: {0}")]
    Config(String),
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
        let store = TempDir::new()?;
        Self::start_in(store, Vec::new())
    }

    /// Starts a server like [`LocalServer::start`] from the configuration
    /// `config` (the text of a nats-server configuration file, e.g.
    /// `deploy/nats/dispatch.conf`), with JetStream on. The file's `listen`
    /// and `server_name` are overridden by the launcher's flags (a free
    /// loopback port, a name of its own), and its `store_dir` lines are
    /// left out for the launcher's private store (nats-server 2.9 refuses a
    /// store directory given both ways), so a file written for production
    /// runs here unchanged and never touches the machine's own store. A
    /// `store_dir` that is not alone on its line is refused. The server
    /// logs to a file in its store: [`LocalServer::log`].
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let conf = std::fs::read_to_string("deploy/nats/dispatch.conf")?
    ///     .replace("CHANGE_ME_NODE_PASSWORD", "node-secret");
    /// let server = dispatcher_nats::LocalServer::start_with_config(&conf)?;
    /// println!("{}", server.url());
    /// # Ok(())
    /// # }
    /// ```
    pub fn start_with_config(config: &str) -> Result<Self, LocalServerError> {
        let store = TempDir::new()?;
        let file = store.path().join(CONFIG_FILE);
        std::fs::write(&file, without_store_dir(config)?)?;
        let check = Command::new(find_binary().ok_or(LocalServerError::NotInstalled)?)
            .arg("-t")
            .arg("-c")
            .arg(&file)
            .stdin(Stdio::null())
            .output()?;
        if !check.status.success() {
            let said = [check.stderr, check.stdout].concat();
            return Err(LocalServerError::Config(
                String::from_utf8_lossy(&said).trim().to_owned(),
            ));
        }
        let extra = vec![
            "-c".to_owned(),
            file.display().to_string(),
            "-l".to_owned(),
            store.path().join(LOG_FILE).display().to_string(),
        ];
        Self::start_in(store, extra)
    }

    /// As [`LocalServer::start`], with more `nats-server` arguments, kept
    /// for [`LocalServer::restart`]: a login the clients must give
    /// (`["--user", "ops", "--pass", "s3cret"]`, `["--auth", "TOKEN"]`),
    /// for example.
    pub fn start_with(args: &[&str]) -> Result<Self, LocalServerError> {
        let store = TempDir::new()?;
        Self::start_in(store, args.iter().map(|a| (*a).to_owned()).collect())
    }

    fn start_in(store: TempDir, extra: Vec<String>) -> Result<Self, LocalServerError> {
        let binary = find_binary().ok_or(LocalServerError::NotInstalled)?;
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

    /// What the server logged so far, for a server started with
    /// [`LocalServer::start_with_config`] (empty otherwise): permission
    /// violations are logged there with the user's name.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.store.path().join(LOG_FILE)).unwrap_or_default()
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

/// `config` with its `store_dir` lines commented out, so that the
/// launcher's `-sd` is the only store directory; an error if a `store_dir`
/// shares its line with something else (it could not be left out alone).
fn without_store_dir(config: &str) -> Result<String, LocalServerError> {
    let mut out = String::with_capacity(config.len());
    for line in config.lines() {
        let code = line.split('#').next().unwrap_or_default();
        let trimmed = code.trim_start();
        if trimmed.starts_with("store_dir") {
            if code.contains(['{', '}', ',']) {
                return Err(LocalServerError::Config(format!(
                    "put `store_dir` on a line of its own to run this file here: {line:?}"
                )));
            }
            out.push_str("# (left out by LocalServer) ");
        } else if code.contains("store_dir") {
            return Err(LocalServerError::Config(format!(
                "put `store_dir` on a line of its own to run this file here: {line:?}"
            )));
        }
        out.push_str(line);
        out.push('\n');
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_dir_lines_are_left_out_and_others_refused() {
        let conf = "listen: 0.0.0.0:4222\njetstream {\n  store_dir: \"/var/lib/nats\"\n}\n";
        let out = without_store_dir(conf).unwrap();
        assert!(out.contains("# (left out by LocalServer)   store_dir: \"/var/lib/nats\""));
        assert!(out.contains("listen: 0.0.0.0:4222"));
        assert!(without_store_dir("# store_dir in a comment\n").is_ok());
        assert!(without_store_dir("jetstream { store_dir: /x }\n").is_err());
        assert!(without_store_dir("jetstream: {max_mem: 1G, store_dir: /x}\n").is_err());
    }
}

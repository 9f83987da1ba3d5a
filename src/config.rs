//! The command line's configuration: clap flags, each also read from a
//! `DISPATCH_*` environment variable, and an optional TOML file
//! (`--config`), in that precedence: a flag beats the variable, which beats
//! the file, which beats the built-in default. Nothing deeper reads the
//! environment.
//!
//! The file's keys are the flags' long names (`nats-url = "nats://…"`,
//! `workers = 4`, `exec-allow = ["/usr/bin/convert"]`); `_` may stand for
//! `-`. A key no command knows is an error, so a typo does not pass
//! silently; a key that only another command knows is ignored, so one file
//! serves `serve` and the client commands alike.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use dispatcher_actors::{DispatcherConfig, NodeId, Priority, RestartPolicy, MAX_WORKERS};
use dispatcher_nats::codec::Limits;
use dispatcher_nats::jetstream::{JetStreamOptions, StorageType};
use dispatcher_nats::{Mode, NodeOptions};

use crate::credentials;
use crate::handlers::{check_env_name, ExecConfigError, ExecOptions};

/// The flag (and its variable) that names the configuration file.
pub const CONFIG_FLAG: &str = "config";
/// The variable that names the configuration file.
pub const CONFIG_ENV: &str = "DISPATCH_CONFIG";

/// Parses `args` as `P`, with the TOML file named by `--config` (or
/// `DISPATCH_CONFIG`) filling in whatever neither a flag nor a variable
/// sets.
pub fn parse_layered<P>(args: Vec<OsString>) -> Result<P, clap::Error>
where
    P: clap::Parser,
{
    let mut command = P::command();
    if let Some(path) = config_path(&args) {
        let values = read_file(&path)
            .map_err(|e| command.error(clap::error::ErrorKind::InvalidValue, format!("{e:#}")))?;
        command = apply_file(command, &values).map_err(|unknown| {
            P::command().error(
                clap::error::ErrorKind::UnknownArgument,
                format!(
                    "{}: unknown setting(s) {}; use the long names of the flags shown by --help",
                    path.display(),
                    unknown.join(", ")
                ),
            )
        })?;
    }
    let matches = command.try_get_matches_from(args)?;
    P::from_arg_matches(&matches)
}

/// `--config PATH`, `--config=PATH` or `DISPATCH_CONFIG`.
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let flag = format!("--{CONFIG_FLAG}");
    let with_eq = format!("--{CONFIG_FLAG}=");
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let Some(s) = arg.to_str() else { continue };
        if s == "--" {
            break;
        }
        if s == flag {
            return iter.next().map(PathBuf::from);
        }
        if let Some(rest) = s.strip_prefix(&with_eq) {
            // clap itself reports an empty `--config=`.
            return (!rest.is_empty()).then(|| PathBuf::from(rest));
        }
    }
    std::env::var_os(CONFIG_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// A file setting: one value or a list.
#[derive(Clone, Debug, PartialEq)]
enum FileValue {
    One(String),
    Many(Vec<String>),
}

/// Reads the TOML file into flag name → value.
fn read_file(path: &Path) -> anyhow::Result<BTreeMap<String, FileValue>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the configuration file {}", path.display()))?;
    parse_file(&text).with_context(|| format!("in the configuration file {}", path.display()))
}

fn parse_file(text: &str) -> anyhow::Result<BTreeMap<String, FileValue>> {
    let table: toml::Table = text.parse()?;
    let mut values = BTreeMap::new();
    for (key, value) in table {
        let name = key.replace('_', "-");
        let value = match value {
            toml::Value::Array(items) => FileValue::Many(
                items
                    .into_iter()
                    .map(|v| scalar(&key, v))
                    .collect::<anyhow::Result<_>>()?,
            ),
            other => FileValue::One(scalar(&key, other)?),
        };
        values.insert(name, value);
    }
    Ok(values)
}

fn scalar(key: &str, value: toml::Value) -> anyhow::Result<String> {
    Ok(match value {
        toml::Value::String(s) => s,
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => anyhow::bail!(
            "{key}: expected a string, number, boolean or a list of them, got {}",
            other.type_str()
        ),
    })
}

/// Makes the file's values the defaults of the arguments with those long
/// names, in every subcommand; returns the keys that no argument has.
fn apply_file(
    mut command: clap::Command,
    values: &BTreeMap<String, FileValue>,
) -> Result<clap::Command, Vec<String>> {
    let mut used = std::collections::BTreeSet::new();
    command = apply_to(command, values, &mut used);
    let unknown: Vec<String> = values
        .keys()
        .filter(|k| !used.contains(*k) && k.as_str() != CONFIG_FLAG)
        .cloned()
        .collect();
    if unknown.is_empty() {
        Ok(command)
    } else {
        Err(unknown)
    }
}

fn apply_to(
    mut command: clap::Command,
    values: &BTreeMap<String, FileValue>,
    used: &mut std::collections::BTreeSet<String>,
) -> clap::Command {
    let targets: Vec<(clap::Id, String)> = command
        .get_arguments()
        .filter_map(|a| Some((a.get_id().clone(), a.get_long()?.to_owned())))
        .filter(|(_, long)| values.contains_key(long) && long != CONFIG_FLAG)
        .collect();
    for (id, long) in targets {
        let value = values[&long].clone();
        used.insert(long);
        command = command.mut_arg(id, |arg| {
            // A secret whose variable --help hides (a password, a URL that
            // may carry one) keeps the file's value out of --help too.
            let secret = arg.is_hide_env_values_set();
            let arg = match value {
                FileValue::One(v) => arg.default_value(v),
                FileValue::Many(vs) => arg.default_values(vs),
            };
            arg.hide_default_value(secret)
        });
    }
    let names: Vec<String> = command
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    for name in names {
        command = command.mut_subcommand(name, |sub| apply_to(sub, values, used));
    }
    command
}

/// A duration: plain seconds (`30`) or with units (`500ms`, `2m`, `24h`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{e}: write seconds (30) or a number with a unit (500ms, 2m, 24h)"))
}

/// One of `critical`, `high`, `normal`, `low`.
pub fn parse_priority(s: &str) -> Result<Priority, String> {
    Priority::parse(s).ok_or_else(|| "use critical, high, normal or low".to_owned())
}

/// Where the NATS server is, and how to log in to it. Its `Debug` shows no
/// secret.
#[derive(Args, Clone)]
pub struct Connection {
    /// NATS server URL(s), comma-separated; the client picks among them and
    /// fails over. A URL may carry the login, `nats://USER:PASSWORD@host` or
    /// `nats://TOKEN@host` (percent-encode `@ : / ? # ,` in them, e.g. `%40`
    /// for `@`); it is masked wherever a URL is printed. URLs that carry one
    /// must carry the same.
    #[arg(
        long,
        global = true,
        env = "DISPATCH_NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub nats_url: Vec<String>,
    /// Subject prefix shared by nodes and clients.
    #[arg(
        long,
        global = true,
        env = "DISPATCH_PREFIX",
        default_value = "dispatch"
    )]
    pub prefix: String,
    /// User name, with --nats-password. Give one way to log in only: user
    /// and password, token, creds file, NKey file, or the URL's (any two
    /// are refused).
    #[arg(
        long,
        global = true,
        env = "DISPATCH_NATS_USER",
        requires = "nats_password"
    )]
    pub nats_user: Option<String>,
    /// Password, with --nats-user; prefer the variable to the flag.
    #[arg(
        long,
        global = true,
        env = "DISPATCH_NATS_PASSWORD",
        hide_env_values = true,
        requires = "nats_user"
    )]
    pub nats_password: Option<String>,
    /// Authentication token; prefer the variable to the flag.
    #[arg(
        long,
        global = true,
        env = "DISPATCH_NATS_TOKEN",
        hide_env_values = true
    )]
    pub nats_token: Option<String>,
    /// Credentials file (user JWT and NKey seed, as `nsc` writes them);
    /// checked at start.
    #[arg(long, global = true, env = "DISPATCH_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// File holding a user NKey seed (one line, `SU…`); checked at start.
    #[arg(long, global = true, env = "DISPATCH_NATS_NKEY")]
    pub nats_nkey: Option<PathBuf>,
    /// CA certificate(s) (PEM) to verify the server with; implies TLS. A
    /// file without a PEM certificate is refused at start.
    #[arg(long, global = true, env = "DISPATCH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), with --tls-key; checked at start.
    #[arg(long, global = true, env = "DISPATCH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Client private key (PEM), with --tls-cert; checked at start.
    #[arg(long, global = true, env = "DISPATCH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Refuse to talk to the server without TLS.
    #[arg(long, global = true, env = "DISPATCH_TLS_REQUIRED")]
    pub tls_required: bool,
    /// Connection name the server shows (monitoring, `nats server report`).
    #[arg(long, global = true, env = "DISPATCH_CONNECTION_NAME")]
    pub connection_name: Option<String>,
    /// Reconnection attempts after a lost connection; 0 = forever.
    #[arg(
        long,
        global = true,
        env = "DISPATCH_MAX_RECONNECTS",
        default_value_t = 0
    )]
    pub max_reconnects: usize,
    /// Longest pause between reconnection attempts (they back off
    /// exponentially from 100 ms up to this).
    #[arg(long, global = true, env = "DISPATCH_RECONNECT_DELAY_MAX", default_value = "5s", value_parser = parse_duration)]
    pub reconnect_delay_max: Duration,
    /// How long connecting may take.
    #[arg(long, global = true, env = "DISPATCH_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
}

impl Connection {
    /// The async-nats options these settings describe, and the servers to
    /// give them (without credentials: those are in the options). Checks the
    /// login and the files it names first: see [`crate::credentials`].
    pub fn options(
        &self,
        default_name: &str,
    ) -> anyhow::Result<(async_nats::ConnectOptions, Vec<async_nats::ServerAddr>)> {
        let (servers, login) = credentials::login(self)?;
        let mut options = async_nats::ConnectOptions::new();
        if let Some(login) = login {
            options = login.apply(options)?;
        }
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if self.tls_required {
            options = options.require_tls(true);
        }
        let max_delay = self.reconnect_delay_max;
        let max_reconnects = (self.max_reconnects > 0).then_some(self.max_reconnects);
        let options = options
            .name(self.connection_name.as_deref().unwrap_or(default_name))
            .connection_timeout(self.connect_timeout)
            .max_reconnects(max_reconnects)
            .reconnect_delay_callback(move |attempt| {
                let exp = attempt.min(16) as u32;
                Duration::from_millis(100u64.saturating_mul(1 << exp)).min(max_delay)
            });
        Ok((options, servers))
    }

    /// Connects; the error names the servers tried (without credentials).
    pub async fn connect(&self, default_name: &str) -> anyhow::Result<async_nats::Client> {
        let (options, servers) = self.options(default_name)?;
        let shown = servers
            .iter()
            .map(|s| s.as_url_str())
            .collect::<Vec<_>>()
            .join(",");
        options
            .connect(servers)
            .await
            // async-nats was given no credentials, but its message is
            // redacted all the same.
            .map_err(|e| anyhow::anyhow!("{}", credentials::redact(&e.to_string())))
            .with_context(|| format!("connecting to NATS at {shown}"))
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = |v: &Option<String>| v.as_ref().map(|_| "***");
        f.debug_struct("Connection")
            .field("nats_url", &credentials::redact_urls(&self.nats_url))
            .field("prefix", &self.prefix)
            .field("nats_user", &self.nats_user)
            .field("nats_password", &secret(&self.nats_password))
            .field("nats_token", &secret(&self.nats_token))
            .field("nats_creds", &self.nats_creds)
            .field("nats_nkey", &self.nats_nkey)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_required", &self.tls_required)
            .field("connection_name", &self.connection_name)
            .finish_non_exhaustive()
    }
}

/// `dispatcher serve` settings.
#[derive(Args, Clone, Debug)]
pub struct ServeConfig {
    /// NATS connection.
    #[command(flatten)]
    pub connection: Connection,
    /// Delivery mode: `jetstream` (at least once, shared state, many nodes)
    /// or `core` (at most once, lowest latency).
    #[arg(long, env = "DISPATCH_MODE", default_value = "jetstream")]
    pub mode: Mode,
    /// This node's id (a subject token); default: host name and a random
    /// suffix. A node refuses to start while another live node has its id.
    #[arg(long, env = "DISPATCH_NODE_ID")]
    pub node_id: Option<String>,
    /// Worker slots, 1 to 10.
    #[arg(long, env = "DISPATCH_WORKERS", default_value_t = MAX_WORKERS)]
    pub workers: usize,
    /// Tasks the local queue holds; default workers × 100 in core mode and
    /// workers × 10 in jetstream mode (where it is how far a node pulls
    /// ahead of its workers, so nodes share a backlog; each consumer's
    /// waiting pull may bring one task more).
    #[arg(long, env = "DISPATCH_QUEUE_CAPACITY")]
    pub queue_capacity: Option<usize>,
    /// Largest submission body, in bytes.
    #[arg(long, env = "DISPATCH_MAX_PAYLOAD", default_value_t = 1024 * 1024)]
    pub max_payload: usize,
    /// Deepest JSON nesting accepted.
    #[arg(long, env = "DISPATCH_MAX_JSON_DEPTH", default_value_t = 64)]
    pub max_json_depth: usize,
    /// Submit requests processed at once; more wait in the subscription.
    #[arg(long, env = "DISPATCH_MAX_INFLIGHT_REQUESTS", default_value_t = 256)]
    pub max_inflight_requests: usize,
    /// Events buffered for publishing; past it they are dropped and counted.
    #[arg(long, env = "DISPATCH_EVENT_BUFFER", default_value_t = 10_000)]
    pub event_buffer: usize,
    /// How long running tasks get to finish at shutdown.
    #[arg(long, env = "DISPATCH_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Interval of heartbeat events and metrics snapshots. A node silent
    /// for three intervals is taken for dead (mode jetstream: its running
    /// tasks go back to the queue), so 1s means a dead node's tasks start
    /// elsewhere within about 4 s; each node sends two small messages per
    /// interval and reads two per peer.
    #[arg(long, env = "DISPATCH_HEARTBEAT_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// How long a cancelled or timed-out handler may take to stop on its
    /// own before it is aborted. An `exec` run gets SIGTERM at once and
    /// SIGKILL after half of it.
    #[arg(long, env = "DISPATCH_CANCEL_GRACE", default_value = "2s", value_parser = parse_duration)]
    pub cancel_grace: Duration,
    /// Per-attempt timeout of tasks that set no `timeout_ms`, in ms.
    #[arg(long, env = "DISPATCH_DEFAULT_TIMEOUT_MS", default_value_t = 30_000)]
    pub default_timeout_ms: u64,
    /// Attempts of tasks that set no `max_attempts`.
    #[arg(long, env = "DISPATCH_DEFAULT_MAX_ATTEMPTS", default_value_t = 3)]
    pub default_max_attempts: u32,
    /// Priority of tasks that set none.
    #[arg(long, env = "DISPATCH_DEFAULT_PRIORITY", default_value = "normal", value_parser = parse_priority)]
    pub default_priority: Priority,
    /// Restarts of one worker slot allowed within --restart-window; past
    /// them the slot is disabled (`worker_disabled`).
    #[arg(long, env = "DISPATCH_RESTART_MAX", default_value_t = 5)]
    pub restart_max: u32,
    /// The window of --restart-max.
    #[arg(long, env = "DISPATCH_RESTART_WINDOW", default_value = "60s", value_parser = parse_duration)]
    pub restart_window: Duration,
    /// First delay before a crashed worker restarts; doubles per restart.
    #[arg(long, env = "DISPATCH_RESTART_BACKOFF", default_value = "100ms", value_parser = parse_duration)]
    pub restart_backoff: Duration,
    /// How long finished task records are kept.
    #[arg(long, env = "DISPATCH_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub retention: Duration,
    /// How often expired records are removed.
    #[arg(long, env = "DISPATCH_CLEANUP_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub cleanup_interval: Duration,
    /// Most task records kept; past it the oldest finished go first.
    #[arg(long, env = "DISPATCH_MAX_RECORDS", default_value_t = 100_000)]
    pub max_records: usize,
    /// Most entries in the error list (the oldest go first): the node's own
    /// list, and in jetstream mode the cluster's error stream (set when
    /// the stream is created).
    #[arg(long, env = "DISPATCH_MAX_ERRORS", default_value_t = 1_000)]
    pub max_errors: usize,
    /// JetStream storage of the streams and buckets: file or memory.
    #[arg(long, env = "DISPATCH_JS_STORAGE", default_value = "file", value_parser = ["file", "memory"])]
    pub js_storage: String,
    /// Replicas of the streams and buckets (in a JetStream cluster).
    #[arg(long, env = "DISPATCH_JS_REPLICAS", default_value_t = 1)]
    pub js_replicas: usize,
    /// A task id published again within this window is dropped as a duplicate.
    #[arg(long, env = "DISPATCH_DUPLICATE_WINDOW", default_value = "2m", value_parser = parse_duration)]
    pub duplicate_window: Duration,
    /// How long a delivery may go unacknowledged before JetStream gives it
    /// to another node; held tasks are kept alive every --keep-alive-interval.
    #[arg(long, env = "DISPATCH_ACK_WAIT", default_value = "30s", value_parser = parse_duration)]
    pub ack_wait: Duration,
    /// How often a node renews its lease on the tasks it holds (below --ack-wait).
    #[arg(long, env = "DISPATCH_KEEP_ALIVE_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub keep_alive_interval: Duration,
    /// Unacknowledged deliveries per consumer, over all nodes.
    #[arg(long, env = "DISPATCH_MAX_ACK_PENDING", default_value_t = 10_000)]
    pub max_ack_pending: i64,
    /// Deliveries of one task message at most, a bound on a message that
    /// takes down every node that pulls it in a way no check catches
    /// (invalid messages are removed on their first delivery; a task's
    /// attempts stop at its max_attempts long before this). Past it the
    /// server stops delivering the message.
    #[arg(long, env = "DISPATCH_MAX_DELIVERIES", default_value_t = 200, value_parser = clap::value_parser!(i64).range(1..))]
    pub max_deliveries: i64,
    /// Deliveries of one task that may begin no attempt (given back
    /// unstarted at shutdown, or taken by a node that died before the
    /// attempt was recorded) before it fails `crash_budget_exhausted`.
    /// Attempts count runs, not deliveries.
    #[arg(long, env = "DISPATCH_CRASH_BUDGET", default_value_t = 20)]
    pub crash_budget: u32,
    /// How long a consumer's waiting pull lasts at the server before the
    /// node renews it. The server pushes a task (new, or redelivered) to a
    /// waiting pull at once; renewing only keeps the pull alive.
    #[arg(long, env = "DISPATCH_IDLE_POLL", default_value = "5s", value_parser = parse_duration)]
    pub idle_poll: Duration,
    /// Most tasks one pull asks for.
    #[arg(long, env = "DISPATCH_FETCH_BATCH", default_value_t = 256)]
    pub fetch_batch: usize,
    /// How long a KV record change that does not end its task (queued,
    /// running, retrying) waits for the next one before it is written: a
    /// task that ends within it costs one record write, not one per step.
    /// A change that ends a task is written at once. Progress waits at
    /// least as long, and is written at most once per 500 ms per task.
    #[arg(long, env = "DISPATCH_RECORD_LINGER", default_value = "50ms", value_parser = parse_duration)]
    pub record_linger: Duration,
    /// A program the `exec` handler may run: the absolute path of an
    /// existing executable, checked at start (repeat the flag, or separate
    /// with commas in the variable). A task's `program` must equal it
    /// exactly. A symlink is followed at every start: allow-listing one
    /// trusts whatever it points to. Without any, `exec` is not served.
    #[arg(
        long = "exec-allow",
        env = "DISPATCH_EXEC_ALLOW",
        value_delimiter = ','
    )]
    pub exec_allow: Vec<String>,
    /// A variable of the node's environment that `exec` programs get, with
    /// its value at start (repeat the flag, or separate with commas in the
    /// variable). Programs get nothing else but `PATH` and
    /// `DISPATCH_EXEC_RUN`, the tag of their run.
    #[arg(long = "exec-env", env = "DISPATCH_EXEC_ENV", value_delimiter = ',')]
    pub exec_env: Vec<String>,
    /// Longest line of an `exec` program's stdout, in bytes; a longer one
    /// is dropped (and counted) as it streams past, never held whole.
    #[arg(long, env = "DISPATCH_EXEC_MAX_LINE", default_value_t = 1024 * 1024)]
    pub exec_max_line: usize,
    /// Bytes of an `exec` program's stdout read per attempt; past them the
    /// rest is read and dropped (so the program is not blocked) and the
    /// attempt fails saying so.
    #[arg(long, env = "DISPATCH_EXEC_MAX_OUTPUT", default_value_t = 64 * 1024 * 1024)]
    pub exec_max_output: u64,
    /// Register the `chaos` handler (fails, panics, sleeps on request).
    #[arg(long, env = "DISPATCH_ENABLE_CHAOS")]
    pub enable_chaos: bool,
}

impl ServeConfig {
    /// The actors' configuration.
    pub fn dispatcher_config(&self) -> Result<DispatcherConfig, String> {
        let node = match &self.node_id {
            Some(id) => NodeId::new(id.as_str()).map_err(|e| e.message)?,
            None => default_node_id(),
        };
        let mut config = DispatcherConfig::new(node);
        config.workers = self.workers;
        config.queue_capacity = self.queue_capacity.or(match self.mode {
            Mode::JetStream => Some(self.workers.saturating_mul(10)),
            Mode::Core => None,
        });
        config.keep_alive_interval = self.keep_alive_interval;
        config.cancel_grace = self.cancel_grace;
        config.defaults.timeout_ms = self.default_timeout_ms;
        config.defaults.max_attempts = self.default_max_attempts;
        config.defaults.priority = self.default_priority;
        config.restart = RestartPolicy {
            max_restarts: self.restart_max,
            within: self.restart_window,
            backoff_initial: self.restart_backoff,
            ..RestartPolicy::default()
        };
        config.retention = self.retention;
        config.cleanup_interval = self.cleanup_interval;
        config.max_records = self.max_records;
        config.error_capacity = self.max_errors;
        // The caller says "invalid configuration" once.
        config.validate().map_err(|e| e.0)?;
        if self.default_timeout_ms == 0 || self.default_timeout_ms > 24 * 3600 * 1000 {
            return Err("default timeout must be 1 ms to 24 h".into());
        }
        if !(1..=100).contains(&self.default_max_attempts) {
            return Err("default max attempts must be 1 to 100".into());
        }
        Ok(config)
    }

    /// `exec`'s options: the allow list and limits as given, `PATH` and
    /// the `--exec-env` variables with their values now (a name that is
    /// not set is left out, with a warning), and half of
    /// `--cancel-grace` between SIGTERM and SIGKILL, so a stopped run is
    /// gone before the worker gives up on the attempt.
    pub fn exec_options(&self) -> Result<ExecOptions, ExecConfigError> {
        let mut env: Vec<(String, OsString)> = Vec::new();
        for name in std::iter::once("PATH").chain(self.exec_env.iter().map(String::as_str)) {
            check_env_name(name)?;
            if env.iter().any(|(n, _)| n == name) {
                continue;
            }
            match std::env::var_os(name) {
                Some(value) => env.push((name.to_owned(), value)),
                None if name == "PATH" => {}
                None => tracing::warn!(
                    name,
                    "--exec-env names a variable the node does not have; exec programs will not get it."
                ),
            }
        }
        Ok(ExecOptions {
            allow: self.exec_allow.clone(),
            env,
            max_line: self.exec_max_line,
            max_output: self.exec_max_output,
            kill_grace: self.cancel_grace / 2,
            ..ExecOptions::default()
        })
    }

    /// The NATS side's options.
    pub fn node_options(&self) -> NodeOptions {
        NodeOptions {
            prefix: self.connection.prefix.clone(),
            mode: self.mode,
            limits: Limits {
                max_payload: self.max_payload,
                max_depth: self.max_json_depth,
            },
            event_buffer: self.event_buffer,
            heartbeat_interval: self.heartbeat_interval,
            shutdown_timeout: self.shutdown_timeout,
            max_inflight_requests: self.max_inflight_requests,
            jetstream: JetStreamOptions {
                storage: if self.js_storage == "memory" {
                    StorageType::Memory
                } else {
                    StorageType::File
                },
                replicas: self.js_replicas,
                duplicate_window: self.duplicate_window,
                ack_wait: self.ack_wait,
                max_ack_pending: self.max_ack_pending,
                max_deliveries: self.max_deliveries,
                crash_budget: self.crash_budget,
                idle_poll: self.idle_poll,
                fetch_batch: self.fetch_batch,
                record_linger: self.record_linger,
                retention: self.retention,
                max_errors: i64::try_from(self.max_errors).unwrap_or(i64::MAX),
                ..JetStreamOptions::default()
            },
        }
    }
}

/// Host name plus a short random suffix, cut to subject-token characters.
pub fn default_node_id() -> NodeId {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "node".into());
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    let host = if host.is_empty() {
        "node".to_owned()
    } else {
        host
    };
    let suffix: u32 = rand::random::<u32>() & 0xff_ffff;
    NodeId::new(format!("{host}-{suffix:06x}")).expect("sanitised to token characters")
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[derive(clap::Parser, Debug)]
    struct TestCli {
        #[arg(long = CONFIG_FLAG, env = CONFIG_ENV)]
        _config: Option<PathBuf>,
        #[command(flatten)]
        serve: ServeConfig,
    }

    fn parse(args: &[&str]) -> Result<TestCli, clap::Error> {
        let mut all = vec![OsString::from("test")];
        all.extend(args.iter().map(OsString::from));
        parse_layered(all)
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn durations_take_seconds_or_units() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert!(parse_duration("soon").unwrap_err().contains("500ms"));
    }

    #[test]
    fn the_file_parses_scalars_and_lists() {
        let values = parse_file("workers = 4\nexec_allow = [\"/bin/a\", \"/bin/b\"]\n").unwrap();
        assert_eq!(values["workers"], FileValue::One("4".into()));
        assert_eq!(
            values["exec-allow"],
            FileValue::Many(vec!["/bin/a".into(), "/bin/b".into()])
        );
        assert!(parse_file("workers = {a = 1}").is_err());
        assert!(parse_file("workers = ").is_err());
    }

    // One test touches the environment, so no other test sees its variables.
    #[test]
    fn flags_beat_the_environment_which_beats_the_file() {
        let f = file(
            "workers = 4\nprefix = \"from-file\"\nretention = \"2h\"\n\
             enable-chaos = true\nexec-allow = [\"/bin/true\"]\nnats-url = \"nats://file:4222\"\n",
        );
        let path = f.path().to_str().unwrap();

        // The file alone fills in defaults.
        let cli = parse(&["--config", path]).unwrap();
        assert_eq!(cli.serve.workers, 4);
        assert_eq!(cli.serve.connection.prefix, "from-file");
        assert_eq!(cli.serve.retention, Duration::from_secs(7200));
        assert!(cli.serve.enable_chaos);
        assert_eq!(cli.serve.exec_allow, vec!["/bin/true".to_owned()]);
        assert_eq!(cli.serve.connection.nats_url, vec!["nats://file:4222"]);
        // What the file leaves out keeps its built-in default.
        assert_eq!(cli.serve.max_payload, 1024 * 1024);

        // The environment beats the file; a flag beats both.
        std::env::set_var("DISPATCH_WORKERS", "6");
        std::env::set_var("DISPATCH_PREFIX", "from-env");
        let cli = parse(&["--config", path, "--prefix", "from-flag"]).unwrap();
        assert_eq!(cli.serve.workers, 6);
        assert_eq!(cli.serve.connection.prefix, "from-flag");
        assert_eq!(cli.serve.retention, Duration::from_secs(7200));

        // DISPATCH_CONFIG names the file when no flag does.
        std::env::remove_var("DISPATCH_WORKERS");
        std::env::remove_var("DISPATCH_PREFIX");
        std::env::set_var(CONFIG_ENV, path);
        let cli = parse(&["--workers", "2"]).unwrap();
        assert_eq!(cli.serve.workers, 2);
        assert_eq!(cli.serve.connection.prefix, "from-file");
        std::env::remove_var(CONFIG_ENV);

        // A typo in the file is an error that names it.
        let typo = file("wokers = 4\n");
        let err = parse(&["--config", typo.path().to_str().unwrap()]).unwrap_err();
        assert!(err.to_string().contains("wokers"), "{err}");
        // A missing file too.
        let err = parse(&["--config", "/nonexistent/dispatcher.toml"]).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/dispatcher.toml"),
            "{err}"
        );
        // A bad value from the file is reported like a bad flag.
        let bad = file("workers = \"many\"\n");
        assert!(parse(&["--config", bad.path().to_str().unwrap()]).is_err());
        // Without a file the built-in defaults hold.
        let cli = parse(&[]).unwrap();
        assert_eq!(cli.serve.workers, MAX_WORKERS);
        assert_eq!(cli.serve.shutdown_timeout, Duration::from_secs(30));
    }

    #[test]
    fn exec_settings_map_onto_the_exec_options() {
        let cli = parse(&[
            "--exec-allow",
            "/bin/sh",
            "--exec-env",
            "PATH,NO_SUCH_VARIABLE_ANYWHERE",
            "--exec-env",
            "HOME",
            "--exec-max-line",
            "100",
            "--exec-max-output",
            "1000",
            "--cancel-grace",
            "4s",
        ])
        .unwrap();
        let options = cli.serve.exec_options().unwrap();
        assert_eq!(options.allow, ["/bin/sh"]);
        let names: Vec<&str> = options.env.iter().map(|(n, _)| n.as_str()).collect();
        // PATH once, unset names left out.
        let expected: Vec<&str> = ["PATH", "HOME"]
            .into_iter()
            .filter(|n| std::env::var_os(n).is_some())
            .collect();
        assert_eq!(names, expected);
        assert_eq!(options.max_line, 100);
        assert_eq!(options.max_output, 1000);
        assert_eq!(options.kill_grace, Duration::from_secs(2));
        // Defaults.
        let options = parse(&[]).unwrap().serve.exec_options().unwrap();
        assert_eq!(options.max_line, 1 << 20);
        assert_eq!(options.max_output, 64 << 20);
        // A name no variable can have.
        let cli = parse(&["--exec-env", "A=B"]).unwrap();
        assert!(matches!(
            cli.serve.exec_options(),
            Err(ExecConfigError::EnvName(_))
        ));
    }

    #[test]
    fn secrets_from_the_file_stay_out_of_help() {
        let f = file(
            "nats-url = \"nats://ops:fil3-secret@h:4222\"\nnats-password = \"fil3-pw\"\n\
             nats-token = \"fil3-token\"\nworkers = 4\n",
        );
        let err = parse(&["--config", f.path().to_str().unwrap(), "--help"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::DisplayHelp);
        let help = err.to_string();
        // Other values from the file are shown as defaults.
        assert!(help.contains("[default: 4]"), "{help}");
        for secret in ["fil3-secret", "fil3-pw", "fil3-token"] {
            assert!(!help.contains(secret), "{secret} in {help}");
        }
    }

    #[test]
    fn serve_config_maps_onto_the_actor_config() {
        let cli = parse(&[
            "--node-id",
            "n1",
            "--workers",
            "3",
            "--restart-max",
            "2",
            "--restart-window",
            "10s",
            "--cancel-grace",
            "250ms",
            "--default-priority",
            "high",
        ])
        .unwrap();
        let config = cli.serve.dispatcher_config().unwrap();
        assert_eq!(config.node.as_str(), "n1");
        assert_eq!(config.workers, 3);
        assert_eq!(config.restart.max_restarts, 2);
        assert_eq!(config.restart.within, Duration::from_secs(10));
        assert_eq!(config.cancel_grace, Duration::from_millis(250));
        assert_eq!(config.defaults.priority, Priority::High);
        let cli = parse(&["--workers", "11"]).unwrap();
        assert!(cli
            .serve
            .dispatcher_config()
            .unwrap_err()
            .contains("1 to 10"));
        let cli = parse(&["--default-max-attempts", "0"]).unwrap();
        assert!(cli.serve.dispatcher_config().is_err());
    }
}

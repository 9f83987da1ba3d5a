//! Built-in handlers: `echo`, `sleep`, `exec` (only with programs
//! allowed), and `chaos` (only when enabled, for
//! demos and fault tests).

mod chaos;
mod exec;
mod sleep;

use dispatcher_actors::{handler_fn, Handlers, Placement, TaskKind};

pub use chaos::Chaos;
pub use exec::{check_env_name, Exec, ExecConfigError, ExecOptions};
pub use sleep::Sleep;

/// Which built-ins to register.
#[derive(Clone, Debug, Default)]
pub struct HandlerOptions {
    /// Register `chaos`.
    pub enable_chaos: bool,
    /// What `exec` may run, and its bounds (it is registered only if
    /// `exec.allow` names programs).
    pub exec: ExecOptions,
}

fn kind(name: &str) -> TaskKind {
    TaskKind::new(name).expect("built-in kinds are valid tokens")
}

/// The built-in handlers. `echo`, `sleep` and `chaos` only await (or do
/// nothing), so they run on the node's event loop
/// ([`Placement::EventLoop`]); `exec` starts programs and reads what they
/// print, so it keeps a thread of its own.
///
/// Fails if `exec`'s settings do not hold (see [`Exec::new`]).
pub fn builtin_handlers(options: &HandlerOptions) -> Result<Handlers, ExecConfigError> {
    let mut handlers = Handlers::new();
    handlers.insert(
        kind("echo"),
        handler_fn(|_ctx, payload| async move { Ok(payload) }).with_placement(Placement::EventLoop),
    );
    handlers.insert(kind("sleep"), Sleep);
    if !options.exec.allow.is_empty() {
        handlers.insert(kind("exec"), Exec::new(options.exec.clone())?);
    }
    if options.enable_chaos {
        handlers.insert(kind("chaos"), Chaos);
    }
    Ok(handlers)
}

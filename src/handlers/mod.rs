//! Built-in handlers: `echo`, `sleep`, and `chaos` (only when enabled, for
//! demos and fault tests).

mod chaos;
mod sleep;

use dispatcher_actors::{handler_fn, Handlers, TaskKind};

pub use chaos::Chaos;
pub use sleep::Sleep;

/// Which built-ins to register.
#[derive(Clone, Debug, Default)]
pub struct HandlerOptions {
    /// Register `chaos`.
    pub enable_chaos: bool,
}

fn kind(name: &str) -> TaskKind {
    TaskKind::new(name).expect("built-in kinds are valid tokens")
}

/// The built-in handlers.
pub fn builtin_handlers(options: &HandlerOptions) -> Handlers {
    let mut handlers = Handlers::new();
    handlers.insert(
        kind("echo"),
        handler_fn(|_ctx, payload| async move { Ok(payload) }),
    );
    handlers.insert(kind("sleep"), Sleep);
    if options.enable_chaos {
        handlers.insert(kind("chaos"), Chaos);
    }
    handlers
}

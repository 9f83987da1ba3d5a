//! The `dispatcher` command. The node, the client commands and the demo are
//! not built yet; this says so instead of pretending.

fn main() {
    eprintln!(
        "dispatcher {}: the node and its CLI are not built yet.\n\
         Today the actor system runs in process: `cargo run --example local`.\n\
         See README.md for what works.",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}

//! The `dispatcher` binary's library: configuration, built-in handlers and
//! the wiring of a node will live here, so that tests reach everything.
//! Not built yet: the actors crate (`dispatcher-actors`) works on its own
//! today; see the README.

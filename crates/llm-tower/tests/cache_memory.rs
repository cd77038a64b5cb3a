//! The in-memory cache store's byte bound is a bound on the process's memory, with the
//! system allocator (see `support/cache_memory.rs`). No test harness (`harness = false`):
//! a plain `main` that runs each case in a child process.

// The child reports its measurement to the parent on stdout.
#![allow(clippy::print_stdout)]

#[path = "support/cache_memory.rs"]
mod support;

fn main() {
    support::main();
}

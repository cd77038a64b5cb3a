//! The in-memory cache store's byte bound is a bound on the process's memory, with the
//! gateway's allocator, mimalloc (see `support/cache_memory.rs`).

// The child reports its measurement to the parent on stdout.
#![allow(clippy::print_stdout)]

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "support/cache_memory.rs"]
mod support;

fn main() {
    support::main();
}

//! A process-wide panic counter: `llm_panics_total` on `/metrics`.
//!
//! [`CatchPanicLayer`](tower_http::catch_panic::CatchPanicLayer) turns a panicking handler
//! into a 500, but a panic in a stream body or a spawned task only ends that body or task,
//! and none of them is visible from outside. A panic hook sees all of them: it counts every
//! panic of the process, then calls the hook that was installed before it (so the message
//! is still printed).

use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};

static PANICS: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();

/// Installs the counting panic hook, once per process (later calls do nothing). The hook
/// counts, then chains to the hook installed before it. [`Metrics`](crate::Metrics) with a
/// recorder call this; call it yourself to count panics without them.
///
/// ```
/// llm_tower_axum::install_panic_counter();
/// let before = llm_tower_axum::panic_count();
/// let _ = std::thread::spawn(|| panic!("counted")).join();
/// assert!(llm_tower_axum::panic_count() > before);
/// ```
pub fn install_panic_counter() {
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::Relaxed);
            previous(info);
        }));
    });
}

/// Panics in this process since [`install_panic_counter`] (0 before it).
pub fn panic_count() -> u64 {
    PANICS.load(Ordering::Relaxed)
}

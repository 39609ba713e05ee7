//! The fuzzing crate's library: the harnesses (one function per fuzz target, in `harness.rs`,
//! also compiled into the stable test `tests/fuzz_regressions.rs`) and the panic set-up the
//! libFuzzer targets run once.

pub mod harness;

use std::sync::Once;

/// Run once by every fuzz target (`fuzz_target!(init: ...)`) before its first input.
///
/// libfuzzer-sys installs a panic hook that aborts on *every* panic, before unwinding. Concord
/// deliberately catches the panics of automerge and yrs on malformed input and turns them into
/// errors (`crdt::record::decode`, `crdt::text::apply_guarded`), so under that hook each of those
/// designed-for paths would be reported as a crash. This puts the standard hook back: a panic
/// that Concord catches is printed and fuzzing goes on, and a panic that escapes the harness
/// (a broken property, or a panic Concord does not catch) still aborts, because libfuzzer-sys
/// aborts when the target unwinds.
///
/// Set `CONCORD_FUZZ_STRICT_PANICS=1` to keep libFuzzer's hook, and so stop on every panic,
/// caught or not: that hunts the upstream automerge and yrs panics Concord masks.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("CONCORD_FUZZ_STRICT_PANICS").is_none_or(|value| value.is_empty() || value == "0") {
            drop(std::panic::take_hook());
        }
    });
}

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
/// designed-for paths would be reported as a crash. This installs a hook that prints the panic's
/// one-line message and location (no backtrace: symbolising one per caught panic would slow
/// fuzzing a hundredfold) and lets it unwind: a panic that Concord catches is just a line on
/// stderr, and a panic that escapes the harness (a broken property, or a panic Concord does not
/// catch) still ends the run as a crash, because libfuzzer-sys aborts when the target unwinds.
///
/// Set `CONCORD_FUZZ_STRICT_PANICS=1` to keep libFuzzer's hook, and so stop on every panic,
/// caught or not, with a backtrace: that hunts the upstream automerge and yrs panics Concord
/// masks, and gives the backtrace of a crash when reproducing it.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("CONCORD_FUZZ_STRICT_PANICS").is_none_or(|value| value.is_empty() || value == "0") {
            std::panic::set_hook(Box::new(|info| eprintln!("panic: {info}")));
        }
    });
}

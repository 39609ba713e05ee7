//! Replays files through a harness on stable, outside libFuzzer, with the standard panic hook
//! (set `RUST_BACKTRACE=1` for a backtrace): `cargo run --manifest-path fuzz/Cargo.toml
//! --example replay -- <target> <file>...`. Exits non-zero if any file panics.
//!
//! With `--known-open <file>` first (`fuzz/known-open.toml`), it triages crashes instead, as
//! `scripts/fuzz` does with every crash a run finds: each panic's message is matched against the
//! known-open bugs, and one line per file says `ok <file>`, `known-open <regression> <file>` or
//! `new <file>: <panic message>`. It then exits non-zero only if some panic is new.

use std::path::Path;
use std::process::ExitCode;

use concord_fuzz::harness;

#[path = "../src/known_open.rs"]
mod known_open;

fn main() -> ExitCode {
    let mut arguments: Vec<String> = std::env::args().skip(1).collect();
    let known = if arguments.first().is_some_and(|first| first == "--known-open") {
        let Some(file) = arguments.get(1).cloned() else {
            eprintln!("usage: replay [--known-open <file>] <target> <file>...");
            return ExitCode::FAILURE;
        };
        arguments.drain(..2);
        match known_open::read(Path::new(&file)) {
            Ok(known) => Some(known),
            Err(error) => {
                eprintln!("{error}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let mut arguments = arguments.into_iter();
    let Some(target) = arguments.next() else {
        eprintln!("usage: replay [--known-open <file>] <target> <file>...");
        return ExitCode::FAILURE;
    };
    let Some(run) = harness::by_name(&target) else {
        eprintln!("unknown target {target:?}");
        return ExitCode::FAILURE;
    };
    if known.is_some() {
        // Triage prints one line per panic instead of the default hook's report, so that the
        // panics Concord catches on purpose do not drown the verdicts.
        std::panic::set_hook(Box::new(|info| eprintln!("panic: {info}")));
    }
    let mut failed = 0;
    for path in arguments {
        let data = match std::fs::read(&path) {
            Ok(data) => data,
            Err(error) => {
                eprintln!("{path}: {error}");
                failed += 1;
                continue;
            }
        };
        let outcome = std::panic::catch_unwind(|| run(&data));
        match (outcome, &known) {
            (Ok(()), _) => println!("ok     {path}"),
            (Err(_), None) => {
                println!("PANIC  {path}");
                failed += 1;
            }
            (Err(payload), Some(known)) => {
                let message = known_open::panic_message(payload.as_ref());
                match known_open::matching(known, &target, &message) {
                    Some(open) => println!("known-open {} {path}", open.regression),
                    None => {
                        let first_line = message.lines().next().unwrap_or_default();
                        println!("new {path}: {first_line}");
                        failed += 1;
                    }
                }
            }
        }
    }
    if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

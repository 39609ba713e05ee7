//! Replays files through a harness on stable, outside libFuzzer, with the standard panic hook
//! (set `RUST_BACKTRACE=1` for a backtrace): `cargo run --manifest-path fuzz/Cargo.toml
//! --example replay -- <target> <file>...`. Exits non-zero if any file panics.

use std::process::ExitCode;

use concord_fuzz::harness;

fn main() -> ExitCode {
    let mut arguments = std::env::args().skip(1);
    let Some(target) = arguments.next() else {
        eprintln!("usage: replay <target> <file>...");
        return ExitCode::FAILURE;
    };
    let run: fn(&[u8]) = match target.as_str() {
        "envelope_decode" => harness::envelope_decode,
        "record_key" => harness::record_key,
        "record_changes" => harness::record_changes,
        "record_convergence" => harness::record_convergence,
        "text_update" => harness::text_update,
        "json_operations" => harness::json_operations,
        "version_vector" => harness::version_vector,
        "replica_messages" => harness::replica_messages,
        "stored_documents" => harness::stored_documents,
        "http_bodies" => harness::http_bodies,
        other => {
            eprintln!("unknown target {other:?}");
            return ExitCode::FAILURE;
        }
    };
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
        if std::panic::catch_unwind(|| run(&data)).is_ok() {
            println!("ok     {path}");
        } else {
            println!("PANIC  {path}");
            failed += 1;
        }
    }
    if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

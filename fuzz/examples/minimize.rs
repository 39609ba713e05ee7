//! Minimises a crashing input on stable, for when `cargo fuzz tmin` finds nothing smaller (inputs
//! whose parts must hold together, such as Yjs updates): removes ever smaller chunks of bytes,
//! then zeroes single bytes, keeping each change after which the harness still panics at the
//! same place (file and line) with the same first line of message.
//! `cargo run --manifest-path fuzz/Cargo.toml --example minimize -- <target> <input> <output>`
//! (the default debug build keeps overflow checks, which some crashes need).

use std::process::ExitCode;
use std::sync::Mutex;

use concord_fuzz::harness;

/// Where and why the last panic happened.
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

fn panic_of(run: fn(&[u8]), data: &[u8]) -> Option<String> {
    *LAST_PANIC.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    if std::panic::catch_unwind(|| run(data)).is_ok() {
        return None;
    }
    LAST_PANIC.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
}

fn main() -> ExitCode {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let [target, input, output] = arguments.as_slice() else {
        eprintln!("usage: minimize <target> <input> <output>");
        return ExitCode::FAILURE;
    };
    let Some(run) = harness::by_name(target) else {
        eprintln!("unknown target {target:?}");
        return ExitCode::FAILURE;
    };
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map(|location| format!("{}:{}", location.file(), location.line()));
        let message = info.to_string();
        let first = message.lines().nth(1).unwrap_or_default().to_owned();
        *LAST_PANIC.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) =
            Some(format!("{} {first}", location.unwrap_or_default()));
    }));
    let mut data = match std::fs::read(input) {
        Ok(data) => data,
        Err(error) => {
            eprintln!("{input}: {error}");
            return ExitCode::FAILURE;
        }
    };
    let Some(wanted) = panic_of(run, &data) else {
        eprintln!("{input} does not panic");
        return ExitCode::FAILURE;
    };
    eprintln!("minimising {} bytes that panic at {wanted}", data.len());
    let mut chunk = data.len().div_ceil(2);
    while chunk >= 1 {
        let mut start = 0;
        while start < data.len() {
            let end = (start + chunk).min(data.len());
            let candidate = [&data[..start], &data[end..]].concat();
            if panic_of(run, &candidate).as_ref() == Some(&wanted) {
                data = candidate;
            } else {
                start += chunk;
            }
        }
        chunk /= 2;
    }
    for index in 0..data.len() {
        if data[index] != 0 {
            let mut candidate = data.clone();
            candidate[index] = 0;
            if panic_of(run, &candidate).as_ref() == Some(&wanted) {
                data = candidate;
            }
        }
    }
    if let Err(error) = std::fs::write(output, &data) {
        eprintln!("{output}: {error}");
        return ExitCode::FAILURE;
    }
    eprintln!("minimised to {} bytes: {output}", data.len());
    ExitCode::SUCCESS
}

//! libFuzzer target `http_bodies`: feeds raw bytes to `concord_fuzz::harness::http_bodies` (see src/harness.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(init: concord_fuzz::init(), |data: &[u8]| concord_fuzz::harness::http_bodies(data));

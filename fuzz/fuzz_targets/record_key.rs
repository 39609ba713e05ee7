//! libFuzzer target `record_key`: feeds raw bytes to `concord_fuzz::harness::record_key` (see src/harness.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(init: concord_fuzz::init(), |data: &[u8]| concord_fuzz::harness::record_key(data));

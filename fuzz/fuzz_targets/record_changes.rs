//! libFuzzer target `record_changes`: feeds raw bytes to `concord_fuzz::harness::record_changes` (see src/harness.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(init: concord_fuzz::init(), |data: &[u8]| concord_fuzz::harness::record_changes(data));

//! libFuzzer target `json_operations`: feeds raw bytes to `concord_fuzz::harness::json_operations` (see src/harness.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(init: concord_fuzz::init(), |data: &[u8]| concord_fuzz::harness::json_operations(data));

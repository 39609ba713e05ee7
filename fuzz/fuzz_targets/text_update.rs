//! libFuzzer target `text_update`: feeds raw bytes to `concord_fuzz::harness::text_update` (see src/harness.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(init: concord_fuzz::init(), |data: &[u8]| concord_fuzz::harness::text_update(data));

//! libFuzzer target `version_vector`: feeds raw bytes to `concord_fuzz::harness::version_vector` (see src/harness.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(init: concord_fuzz::init(), |data: &[u8]| concord_fuzz::harness::version_vector(data));

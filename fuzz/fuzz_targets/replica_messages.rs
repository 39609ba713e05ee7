//! libFuzzer target `replica_messages`: feeds raw bytes to `concord_fuzz::harness::replica_messages` (see src/harness.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(init: concord_fuzz::init(), |data: &[u8]| concord_fuzz::harness::replica_messages(data));

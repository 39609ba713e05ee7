//! libFuzzer target `pgoutput_decode`: feeds raw bytes to `concord_fuzz::harness::pgoutput_decode` (see src/harness.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(init: concord_fuzz::init(), |data: &[u8]| concord_fuzz::harness::pgoutput_decode(data));

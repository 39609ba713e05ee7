//! libFuzzer target `stored_documents`: feeds raw bytes to `concord_fuzz::harness::stored_documents` (see src/harness.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(init: concord_fuzz::init(), |data: &[u8]| concord_fuzz::harness::stored_documents(data));

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| syncrelay_fuzz::sync_job(data));

//! Fuzz target: bytes as a stream of mihomo frames through the parser and the diff (see `src/lib.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mihomo_connections_tracker_fuzz::snapshot(data);
});

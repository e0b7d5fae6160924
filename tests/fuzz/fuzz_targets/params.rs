//! Fuzz target: bytes as a query string through the parameter parser and every API handler (see `src/lib.rs`).
#![no_main]

use mihomo_connections_tracker_fuzz::{params, Fixture};

thread_local! {
    static FIXTURE: Fixture = Fixture::new(
        std::env::temp_dir().join(format!("mct-fuzz-params-{}", std::process::id())),
    );
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    FIXTURE.with(|fx| params(fx, data));
});

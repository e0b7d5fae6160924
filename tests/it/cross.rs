//! A cross-built binary (`make cross`: aarch64 under qemu-aarch64) doing the main job against the fake mihomo.
//! Ignored in `make test` (it needs the cross build); `make cross` runs it with `MCT_CROSS_BIN` and
//! `MCT_CROSS_RUNNER` set.

use crate::binary::{standalone_args, Proc};
use crate::fake_mihomo::{frame, FakeMihomo};
use crate::support::*;

#[test]
#[ignore]
fn cross_built_binary_records_and_stops_cleanly() {
    let bin = std::env::var("MCT_CROSS_BIN").expect("MCT_CROSS_BIN: run this through `make cross`");
    let runner = std::env::var("MCT_CROSS_RUNNER").expect("MCT_CROSS_RUNNER: e.g. qemu-aarch64");
    let dir = TempDir::new("cross");
    let db = dir.path("t.db");
    let fake = FakeMihomo::start(None);
    let args = standalone_args(&db, &fake, 100, &[]);
    let mut p = Proc::spawn_with(&runner, &[&bin], &args);
    p.wait_line("api: listening on");
    fake.wait_connected();
    fake.push(frame(
        10,
        &[("a", 1, 10, "a.example"), ("b", 2, 20, "b.example")],
    ));
    fake.push(frame(20, &[("a", 5, 50, "a.example")]));
    let rows = wait_stored(&db, "a grown and b closed", |r| {
        r.len() == 2 && r[0].download == 50 && r[1].end_ms.is_some()
    });
    assert_stored(&rows, &[("a", 5, 50, true), ("b", 2, 20, false)]);
    p.signal("TERM");
    assert_eq!(p.wait_exit(), 0);
}

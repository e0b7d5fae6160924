use super::*;

#[test]
fn reuse_grows_with_scan_time() {
    assert_eq!(reuse_for(Duration::from_millis(1)), MIN_REUSE);
    assert_eq!(reuse_for(Duration::from_secs(3)), Duration::from_secs(30));
    assert_eq!(reuse_for(Duration::from_secs(3600)), MAX_REUSE);
}

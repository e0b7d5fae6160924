//! The one integration-test binary: the real program against fakes on loopback.

mod fake_mihomo;
mod standalone;
mod support;

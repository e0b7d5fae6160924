//! The one integration-test binary: the real program against fakes on loopback, one module per area.

mod api;
mod binary;
mod dashboard;
mod fake_mihomo;
mod standalone;
mod support;

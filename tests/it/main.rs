//! The one integration-test binary: one module per concern.

mod sync;

//! Tests over real QUIC on 127.0.0.1, with certificates generated into temporary directories.

mod bad_frames;
mod certificates;
mod exchange;
mod lifecycle;
mod refusals;
pub(crate) mod support;

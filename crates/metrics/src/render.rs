//! A registry as exposition text.

use prometheus::{Encoder, Registry, TextEncoder};

/// The `Content-Type` of the text exposition format, version 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every metric family of `registry`, as exposition text.
pub fn render(registry: &Registry) -> String {
    let mut out = Vec::with_capacity(4096);
    // Encoding our own metric families into a Vec fails only on an invalid family (e.g.
    // no samples), which the registry already refuses at registration.
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut out) {
        log::error!("rendering metrics failed: {e}");
    }
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

//! What `polaris-dispatch` and `polaris-agent` share, and nothing else: the signed envelope
//! format, the 16-bit result codes and the rules for host ids. Both programs depend on this
//! crate and neither depends on the other, so an agent never links the dispatcher's web stack.
//!
//! # Layout
//! - [`wire`]: job envelopes and host results, HMAC-signed, and the tube names they travel on.
//! - [`codes`]: the result and error codes (`(type << 8) | code`).
//! - [`queue_flags`]: `--queue` and its TLS flags, as both programs take them.
//! - [`host_id`]: what a host id may be (so that `host.<id>` is always a valid tube name).

#![deny(unsafe_code)]

pub mod codes;
pub mod host_id;
pub mod queue_flags;
pub mod wire;

//! The beanstalk wire protocol: reply bytes, command parsing and framing.
//!
//! # Layout
//!
//! - `reply`: the fixed reply lines ([`reply::NOT_FOUND`], …) and [`ReplyLine`], which
//!   assembles the others on the stack.
//! - `tube_name`: [`TubeName`] and [`is_valid_tube_name`], the one tube-name rule.
//! - `command`: [`Command`], [`PutOptions`], [`Counted`], and the parsing of one
//!   command line.
//! - `decoder`: the two-phase framing [`Decoder`], its [`Limits`] and the [`Decoded`]
//!   events it yields.
//! - [`client`]: a small blocking client.
//! - `tls` (feature `tls`): PEM loading and the client's TLS configuration, shared with
//!   polarisd's TLS listener. Off by default, so the engine links no TLS.
//!
//! Everything but the client is a pure function of its input bytes, so it can be
//! tested (and fuzzed) without sockets. Framing is two-phase, as in beanstalkd: a
//! [`Decoder`] first checks whether a complete line (or body) is buffered, without
//! allocating, and only then parses it into a [`Command`].
//!
//! Parsing follows beanstalkd 1.12 to the byte, quirks included: commands match
//! by prefix in a fixed order, numbers may be preceded by runs of spaces, a line
//! ends at the first `\r` only if `\n` follows it, and so on. Where a quirk is
//! surprising, the comment says which client-visible behaviour it preserves.

#![deny(unsafe_code)]

pub mod client;
mod command;
mod decoder;
pub mod reply;
#[cfg(feature = "tls")]
pub mod tls;
mod tube_name;

pub use command::{Command, Counted, PutOptions};
pub use decoder::{
    scan_line_end, Decoded, Decoder, Limits, DEFAULT_MAX_JOB_SIZE, DEFAULT_MAX_LINE, MAX_JOB_SIZE_LIMIT,
};
pub use reply::ReplyLine;
pub use tube_name::{is_valid_tube_name, TubeName, MAX_TUBE_NAME};

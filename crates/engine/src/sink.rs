//! How the engine answers: the [`ReplySink`] it writes replies into, and the
//! [`Outcome`] that tells the server what to do with a connection next.

use crate::conn::ConnId;

/// Where the engine writes replies.
pub trait ReplySink {
    /// Appends `bytes`, one whole reply, to the output of `conn`.
    fn send(&mut self, conn: ConnId, bytes: &[u8]);

    /// Appends one reply made of several pieces (a header line, a body, its CRLF).
    /// Every engine reply goes out in exactly one `send` or `send_parts` call, so a
    /// sink can tell where each reply begins and ends.
    fn send_parts(&mut self, conn: ConnId, parts: &[&[u8]]) {
        for part in parts {
            self.send(conn, part);
        }
    }
}

/// What the server should do with the connection after a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The command was answered; go on with the next one.
    Done,
    /// The connection waits in `reserve`; read no further commands from it
    /// until the engine sends it a reply.
    Blocked,
    /// Close the connection (`quit`).
    Close,
}

/// A sink for contexts where no connection can be waiting (restore).
pub(crate) struct NoReplies;

impl ReplySink for NoReplies {
    fn send(&mut self, _conn: ConnId, _bytes: &[u8]) {}
}

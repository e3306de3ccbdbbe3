//! Engine tests driven by a fake clock, without sockets.

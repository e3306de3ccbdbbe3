//! The `decoder` target: bytes split at arbitrary points into a [`Decoder`] with
//! small limits.

use crate::input::Input;
use bytes::BytesMut;
use polaris_proto::{Command, Decoded, Decoder, Limits, DEFAULT_MAX_JOB_SIZE, DEFAULT_MAX_LINE};

/// What a decoder made of a whole input: its events, the bytes it left buffered,
/// and how many body bytes it still wanted.
type Decoding = (Vec<Decoded>, Vec<u8>, Option<usize>);

/// Layout: a byte for the line limit (16 to 64, the server's smallest, or the
/// default 224), a byte for the body limit (0 to 63, or the default), four bytes
/// seeding the split points; the rest is the stream.
///
/// Checks: no panic; the same events, the same bytes left over, however the
/// stream is split (whole, byte by byte, pseudo-random chunks); the decoder never
/// holds more than one line limit (outside a body) or one body of unconsumed
/// input; no `put` body is over the limit.
pub fn decoder(data: &[u8]) {
    let mut input = Input::new(data);
    let line = input.byte();
    let max_line = if line >= 240 { DEFAULT_MAX_LINE } else { 16 + usize::from(line % 49) };
    let job = input.byte();
    let max_job_size = if job == 255 { DEFAULT_MAX_JOB_SIZE } else { u32::from(job % 64) };
    let mut seed = input.u32() | 1;
    let limits = Limits { max_line, max_job_size };
    let stream = input.rest();

    let whole = decode(limits, stream, |_| stream.len());
    let bytewise = decode(limits, stream, |_| 1);
    let chunked = decode(limits, stream, |_| {
        // xorshift32: cheap, deterministic split points.
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        1 + seed as usize % (2 * max_line)
    });
    assert_eq!(whole, bytewise, "byte-by-byte input decodes differently from the whole ({limits:?})");
    assert_eq!(whole, chunked, "chunked input decodes differently from the whole ({limits:?})");
}

fn decode(limits: Limits, stream: &[u8], mut next_chunk: impl FnMut(usize) -> usize) -> Decoding {
    let mut decoder = Decoder::new(limits);
    let mut buf = BytesMut::new();
    let mut events = Vec::new();
    let mut pos = 0;
    while pos < stream.len() {
        let end = (pos + next_chunk(pos).max(1)).min(stream.len());
        buf.extend_from_slice(&stream[pos..end]);
        pos = end;
        while let Some(event) = decoder.decode(&mut buf) {
            if let Decoded::Command(Command::Put { body, .. }) = &event {
                assert!(body.len() <= limits.max_job_size as usize, "a body over the size limit was accepted");
            }
            events.push(event);
        }
        // Waiting for input, the decoder holds less than what it waits for.
        match decoder.body_bytes_wanted() {
            Some(wanted) => assert!(buf.len() < wanted, "{} bytes buffered, a body of {wanted} wanted", buf.len()),
            None => assert!(buf.len() < limits.max_line, "{} bytes buffered outside a body", buf.len()),
        }
    }
    (events, buf.to_vec(), decoder.body_bytes_wanted())
}

//! The `envelope` target: verifying signed messages, and parsing their payloads.

use crate::input::Input;
use polaris_ops_wire::wire::{self, HostResult, JobEnvelope, Secret};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;

/// Layout: a byte choosing the mode, then its input.
///
/// - Mode 0, any message: [`wire::open`] never panics, and accepts a message only
///   if it is exactly what [`wire::sign`] makes of its payload.
/// - Mode 1, a payload signed and then changed: two bytes of position, a byte of
///   kind (flip bits, insert a byte, delete a byte, cut the message there), a byte of
///   value, then the payload. The signed message opens to the payload; the changed one never opens.
/// - Mode 2, a payload: parsing it as a [`JobEnvelope`] or a [`HostResult`] never
///   panics, and what parses writes back and reads back the same.
pub fn envelope(data: &[u8]) {
    let secret = Secret::new(b"fuzzing-secret-0123456789".to_vec()).expect("long enough");
    let mut input = Input::new(data);
    match input.byte() % 3 {
        0 => {
            let message = input.rest();
            let _ = wire::unverified_payload(message);
            if let Ok(payload) = wire::open(&secret, message) {
                assert_eq!(wire::sign(&secret, payload), message, "open accepted a message sign would not make");
            }
        }
        1 => {
            let pos = usize::from(input.u16());
            let change = input.byte();
            let value = input.byte();
            let payload = input.rest();
            let signed = wire::sign(&secret, payload);
            assert_eq!(wire::open(&secret, &signed), Ok(payload), "a signed message does not open");
            let mut changed = signed.clone();
            let at = pos % (signed.len() + 1);
            match change % 4 {
                0 => {
                    let at = pos % signed.len();
                    changed[at] ^= value.max(1);
                }
                1 => changed.insert(at, value),
                2 => {
                    changed.remove(pos % signed.len());
                }
                _ => changed.truncate(at.min(signed.len() - 1)),
            }
            let opened = wire::open(&secret, &changed);
            assert!(
                opened.is_err(),
                "a changed message opened: {:?} -> {:?}",
                String::from_utf8_lossy(&signed),
                String::from_utf8_lossy(&changed)
            );
        }
        _ => {
            let payload = input.rest();
            round_trips::<JobEnvelope>(payload);
            round_trips::<HostResult>(payload);
        }
    }
}

fn round_trips<T: Serialize + DeserializeOwned + PartialEq + Debug>(payload: &[u8]) {
    if let Ok(value) = serde_json::from_slice::<T>(payload) {
        let written = serde_json::to_vec(&value).expect("a parsed payload serializes");
        let again: T = serde_json::from_slice(&written).expect("a written payload parses");
        assert_eq!(again, value, "a payload reads back differently");
    }
}

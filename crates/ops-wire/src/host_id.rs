//! Host ids: the name of a host in the dispatcher's tables and of its tube on the queue.

/// Longest host id, in bytes.
pub const MAX_HOST_ID_LEN: usize = 64;

/// Whether `id` can be a host id: 1–64 bytes of `A-Z a-z 0-9 . _ -`, not starting with
/// `-` or `.`. That keeps `host.<id>` a valid tube name.
pub fn is_valid_host_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_HOST_ID_LEN
        && !id.starts_with(['-', '.'])
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ids_keep_tube_names_valid() {
        assert!(is_valid_host_id("web-01.example_com"));
        for bad in ["", "-x", ".x", "a b", "a/b", "a\r\nput"] {
            assert!(!is_valid_host_id(bad), "{bad:?}");
        }
        assert!(polaris_proto::is_valid_tube_name(crate::wire::host_tube(&"h".repeat(MAX_HOST_ID_LEN)).as_bytes()));
    }
}

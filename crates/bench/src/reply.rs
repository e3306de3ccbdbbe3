//! Reading replies out of a byte buffer, for the load loop and the blocking helpers.

/// Where the reply line at the start of `buf` ends (the index of its `\r\n`), or `None`
/// if the line is not complete yet.
pub(crate) fn find_crlf(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = memchr::memchr(b'\n', &buf[from..]) {
        let i = from + i;
        if i > 0 && buf[i - 1] == b'\r' {
            return Some(i - 1);
        }
        from = i + 1;
    }
    None
}

pub(crate) fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

/// Reads `key: value` from a `stats` YAML body.
pub(crate) fn stats_field(yaml: &[u8], key: &str) -> Option<u64> {
    let text = String::from_utf8_lossy(yaml);
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(": ")?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_and_numbers() {
        assert_eq!(find_crlf(b"INSERTED 5\r\n"), Some(10));
        assert_eq!(find_crlf(b"a\nb\r\n"), Some(3));
        assert_eq!(find_crlf(b"abc\r"), None);
        assert_eq!(parse_u64(b"00000000000000001234"), Some(1234));
        assert_eq!(parse_u64(b"99999999999999999999"), None);
        assert_eq!(parse_u64(b"1234"), Some(1234));
        assert_eq!(
            stats_field(b"---\ncurrent-jobs-urgent: 1\ncurrent-jobs-ready: 42\n", "current-jobs-ready"),
            Some(42)
        );
    }
}

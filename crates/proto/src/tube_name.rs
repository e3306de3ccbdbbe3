//! Tube names: [`TubeName`] and [`is_valid_tube_name`], the one copy of the rule.

/// Longest tube name.
pub const MAX_TUBE_NAME: usize = 200;

/// A validated tube name: 1–200 bytes of `A-Za-z0-9-+/;.$_()`, not starting with `-`.
/// Shared, so that cloning one (every job record names its tube) costs no allocation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TubeName(std::sync::Arc<str>);

impl TubeName {
    /// Validates `raw` as beanstalkd's `name_is_ok` does.
    ///
    /// ```
    /// use polaris_proto::TubeName;
    /// assert!(TubeName::parse(b"host.web-01").is_some());
    /// assert!(TubeName::parse(b"-leading-dash").is_none());
    /// assert!(TubeName::parse(&[b'a'; 201]).is_none());
    /// ```
    pub fn parse(raw: &[u8]) -> Option<TubeName> {
        // All name characters are ASCII, so the conversion is lossless once the check holds.
        is_valid_tube_name(raw).then(|| TubeName(String::from_utf8_lossy(raw).into()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TubeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `raw` is a tube name the protocol accepts (beanstalkd's `name_is_ok`): 1–200
/// bytes of `A-Z a-z 0-9 - + / ; . $ _ ( )`, not starting with `-`. The one copy of the
/// rule: the decoder, the client and the ops channel's host ids all ask it.
pub fn is_valid_tube_name(raw: &[u8]) -> bool {
    !raw.is_empty() && raw.len() <= MAX_TUBE_NAME && raw[0] != b'-' && raw.iter().all(|&b| is_name_char(b))
}

pub(crate) fn is_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-+/;.$_()".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tube_name_rules() {
        assert!(TubeName::parse(&[b'a'; 200]).is_some());
        assert!(TubeName::parse(&[b'a'; 201]).is_none());
        assert!(TubeName::parse(b"A-Za-z0-9+/;.$_()").is_some());
        assert!(TubeName::parse(b"a b").is_none());
        assert!(TubeName::parse(b"").is_none());
    }
}

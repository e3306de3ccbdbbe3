//! The baseline on the host: every selected entry as `integrity.init` (or the last
//! `integrity.update`) found it, signed with HMAC-SHA256 under the agent's shared secret.
//!
//! The file is a signed message as on the queue (`polaris-v1 <hex MAC>\n<JSON>`), and the
//! JSON names what it is and the host it belongs to, so neither an edited baseline, nor
//! another host's, nor a queue message copied into its place is taken for this host's
//! baseline. It is written to a temporary file, fsynced, and renamed into place.

use super::scan::Entry;
use polaris_ops_wire::wire::{self, Secret};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;

/// What the `kind` field of a baseline says.
const KIND: &str = "polaris-integrity-baseline";

/// A baseline's content.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Baseline {
    /// Always [`KIND`].
    pub kind: String,
    /// Format version (1).
    pub v: u32,
    /// The host it was made on.
    pub host: String,
    /// Unix seconds when it was made.
    pub created_at: u64,
    /// SHA-256 of the rules file's text it was made with, to say when the rules changed.
    pub rules_sha256: String,
    /// The entries, by escaped path.
    pub entries: BTreeMap<String, Entry>,
}

impl Baseline {
    /// A baseline of `entries`, made now on `host`.
    pub fn new(host: &str, rules_sha256: String, entries: BTreeMap<String, Entry>) -> Baseline {
        Baseline { kind: KIND.into(), v: 1, host: host.into(), created_at: wire::unix_now(), rules_sha256, entries }
    }
}

/// Why a baseline could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    /// There is none.
    #[error("no baseline at {0}")]
    Missing(String),
    /// It fails its MAC, is unreadable JSON under a good MAC, or is another host's.
    #[error("baseline {path} is not trustworthy: {reason}")]
    Tampered {
        /// The file.
        path: String,
        /// What gave it away.
        reason: String,
    },
    /// It could not be read or written.
    #[error("baseline {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Reads and verifies the baseline at `path` for `host`.
pub fn read(path: &Path, secret: &Secret, host: &str) -> Result<Baseline, BaselineError> {
    let shown = path.display().to_string();
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(BaselineError::Missing(shown)),
        Err(source) => return Err(BaselineError::Io { path: shown, source }),
    };
    let tampered = |reason: String| BaselineError::Tampered { path: shown.clone(), reason };
    let payload =
        wire::open(secret, &bytes).map_err(|e| tampered(format!("{e} (HMAC-SHA256 under the shared secret)")))?;
    let baseline: Baseline =
        serde_json::from_slice(payload).map_err(|e| tampered(format!("signed, but not a baseline: {e}")))?;
    if baseline.kind != KIND {
        return Err(tampered(format!("signed, but a {:?}, not a baseline", baseline.kind)));
    }
    if baseline.host != host {
        return Err(tampered(format!("made for host {:?}, not {host:?}", baseline.host)));
    }
    Ok(baseline)
}

/// Signs and writes `baseline` to `path`, atomically.
pub fn write(path: &Path, secret: &Secret, baseline: &Baseline) -> Result<(), BaselineError> {
    let io = |source: std::io::Error| BaselineError::Io { path: path.display().to_string(), source };
    let payload = serde_json::to_vec(baseline).map_err(|e| io(std::io::Error::other(e)))?;
    let signed = wire::sign(secret, &payload);
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    let tmp = dir.join(name);
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        // Owner only: it holds the hashes of every selected file, /etc/shadow's too. A
        // leftover of a crash is removed first, so the mode is this one.
        let _ = std::fs::remove_file(&tmp);
        let mut file =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
        file.write_all(&signed).map_err(io)?;
        file.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::new(b"0123456789abcdef-baseline".to_vec()).expect("long enough")
    }

    #[test]
    fn an_edited_baseline_is_caught() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("integrity.baseline");
        assert!(matches!(read(&path, &secret(), "h1"), Err(BaselineError::Missing(_))));
        let mut entries = BTreeMap::new();
        entries.insert(
            "/etc/passwd".to_string(),
            Entry {
                attrs: super::super::attrs::Attrs::SHA256,
                file_type: 'f',
                perm: None,
                uid: None,
                gid: None,
                size: None,
                block_count: None,
                access_time: None,
                modify_time: None,
                change_time: None,
                inode: None,
                link_count: None,
                link_name: None,
                sha256: Some("aa".repeat(32)),
                sha512: None,
                blake3: None,
            },
        );
        write(&path, &secret(), &Baseline::new("h1", String::new(), entries)).expect("written");
        assert_eq!(read(&path, &secret(), "h1").expect("verifies").entries.len(), 1);
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777, 0o600);
        // Another host's baseline, even correctly signed, is not this one's.
        assert!(matches!(read(&path, &secret(), "h2"), Err(BaselineError::Tampered { .. })));
        // An attacker who changed a file and then its hash in the baseline.
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, text.replace(&"aa".repeat(32), &"bb".repeat(32))).expect("edit");
        let e = read(&path, &secret(), "h1").expect_err("tampered");
        assert!(matches!(e, BaselineError::Tampered { .. }), "{e}");
        // Or re-signed it with a key of their own.
        let other = Secret::new(b"attacker-key-0123456789".to_vec()).expect("long enough");
        write(&path, &other, &Baseline::new("h1", String::new(), BTreeMap::new())).expect("written");
        assert!(matches!(read(&path, &secret(), "h1"), Err(BaselineError::Tampered { .. })));
    }
}

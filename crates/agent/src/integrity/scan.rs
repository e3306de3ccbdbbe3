//! Walks the tree the rules select and records each entry's attributes: the walk (one
//! thread, `lstat` only, never following a symlink), then the content hashes, spread over
//! a pool of threads, each file read in fixed-size chunks.

use super::attrs::Attrs;
use super::rules::ftype;
use super::select::{Decision, Selection};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use std::collections::BTreeMap;
use std::io::Read as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Bytes read at a time when hashing.
const READ_CHUNK: usize = 256 * 1024;

/// What is recorded of one file: its type, and the attributes its rule selects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The attributes its rule selected.
    pub attrs: Attrs,
    /// Its type, as a restriction letter (`f d l c b p s`).
    pub file_type: char,
    /// Permission bits (`mode & 0o7777`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perm: Option<u32>,
    /// Owner uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Group gid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// 512-byte blocks allocated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_count: Option<u64>,
    /// Access time, Unix seconds (AIDE's resolution).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_time: Option<i64>,
    /// Modification time, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modify_time: Option<i64>,
    /// Inode change time, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_time: Option<i64>,
    /// Inode number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inode: Option<u64>,
    /// Hard link count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_count: Option<u64>,
    /// A symlink's target, as stored (escaped like paths).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_name: Option<String>,
    /// Hex SHA-256 of a regular file's content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Hex SHA-512 of a regular file's content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha512: Option<String>,
    /// Hex BLAKE3 of a regular file's content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
}

/// How to scan.
#[derive(Debug, Clone, Default)]
pub struct ScanOptions {
    /// Hashing threads (at least 1).
    pub threads: usize,
    /// Whether to walk into proc, sysfs and the other kernel pseudo-filesystems.
    pub pseudo_filesystems: bool,
    /// Growing files of the baseline, by escaped path, with their size then: a file now
    /// larger is also hashed over that many first bytes, so an append is told from a
    /// rewrite (AIDE's `growing`).
    pub growing: std::collections::HashMap<String, u64>,
}

/// What a scan found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Every selected entry, by escaped path.
    pub entries: BTreeMap<String, Entry>,
    /// What could not be read (directories, files to hash), one line each.
    pub warnings: Vec<String>,
    /// Mount points of pseudo-filesystems not walked into.
    pub skipped_pseudo: Vec<String>,
    /// For growing files now larger than in the baseline: the hashes of their first
    /// baseline-size bytes.
    pub prefix_hashes: std::collections::HashMap<String, Hashes>,
}

/// A path as text: UTF-8 as it is, except `\` written `\\` and bytes that are not UTF-8
/// written `\xNN`, so different names never collapse into one.
pub fn escape_path(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

fn type_bit(ft: std::fs::FileType) -> u8 {
    if ft.is_file() {
        ftype::FILE
    } else if ft.is_dir() {
        ftype::DIR
    } else if ft.is_symlink() {
        ftype::LINK
    } else if ft.is_char_device() {
        ftype::CHAR
    } else if ft.is_block_device() {
        ftype::BLOCK
    } else if ft.is_fifo() {
        ftype::FIFO
    } else {
        ftype::SOCKET
    }
}

/// The attributes of `meta` that `attrs` selects.
fn entry_of(path: &Path, meta: &std::fs::Metadata, attrs: Attrs, warnings: &mut Vec<String>) -> Entry {
    let bit = type_bit(meta.file_type());
    // As AIDE, an attribute a type does not have is not recorded for it (hashes of a
    // directory, the target of a file), so a file that became a directory is reported
    // for its type, not for a hash that vanished.
    let mut attrs = attrs;
    if bit != ftype::FILE {
        attrs = attrs.without(Attrs::HASHES);
    }
    if bit != ftype::LINK {
        attrs = attrs.without(Attrs::LNAME);
    }
    let pick = |a: Attrs| attrs.contains(a);
    let link_name = if pick(Attrs::LNAME) && bit == ftype::LINK {
        match std::fs::read_link(path) {
            Ok(target) => Some(escape_path(target.as_os_str().as_bytes())),
            Err(e) => {
                warnings.push(format!("{}: cannot read link: {e}", escape_path(path.as_os_str().as_bytes())));
                None
            }
        }
    } else {
        None
    };
    Entry {
        attrs,
        file_type: ftype::letter(bit),
        perm: pick(Attrs::PERM).then_some(meta.mode() & 0o7777),
        uid: pick(Attrs::UID).then_some(meta.uid()),
        gid: pick(Attrs::GID).then_some(meta.gid()),
        size: pick(Attrs::SIZE).then_some(meta.size()),
        block_count: pick(Attrs::BCOUNT).then_some(meta.blocks()),
        access_time: pick(Attrs::ATIME).then_some(meta.atime()),
        modify_time: pick(Attrs::MTIME).then_some(meta.mtime()),
        change_time: pick(Attrs::CTIME).then_some(meta.ctime()),
        inode: pick(Attrs::INODE).then_some(meta.ino()),
        link_count: pick(Attrs::LCOUNT).then_some(meta.nlink()),
        link_name,
        sha256: None,
        sha512: None,
        blake3: None,
    }
}

/// A file waiting for its hashes.
struct HashJob {
    key: String,
    path: std::path::PathBuf,
    attrs: Attrs,
    size: u64,
    dev: u64,
    ino: u64,
    /// Also hash the first this many bytes (a growing file that grew).
    prefix: Option<u64>,
}

/// Walks from `/` as AIDE does, recording what `selection` selects, then hashes.
pub fn scan(selection: &mut Selection, options: &ScanOptions) -> Scan {
    let mut scan = Scan::default();
    let mut jobs: Vec<HashJob> = Vec::new();
    let root = Path::new("/");
    let mut stack: Vec<(std::path::PathBuf, u64)> = Vec::new();
    // Directories walked, by device and inode: a bind mount of an ancestor inside its own
    // tree is walked once, not forever.
    let mut walked: std::collections::HashSet<(u64, u64)> = std::collections::HashSet::new();
    match std::fs::symlink_metadata(root) {
        Ok(meta) => {
            let decision = selection.classify(b"/", ftype::DIR);
            record(selection, root, &meta, decision, options, &mut scan, &mut jobs);
            walked.insert((meta.dev(), meta.ino()));
            stack.push((root.to_path_buf(), meta.dev()));
        }
        Err(e) => scan.warnings.push(format!("/: {e}")),
    }
    while let Some((dir, dir_dev)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => {
                scan.warnings.push(format!("{}: cannot list: {e}", escape_path(dir.as_os_str().as_bytes())));
                continue;
            }
        };
        let mut children: Vec<std::path::PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
        children.sort();
        for path in children {
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(meta) => meta,
                // Gone between readdir and lstat: not there, as far as this scan goes.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    scan.warnings.push(format!("{}: {e}", escape_path(path.as_os_str().as_bytes())));
                    continue;
                }
            };
            let bytes = path.as_os_str().as_bytes();
            let bit = type_bit(meta.file_type());
            let decision = selection.classify(bytes, bit);
            record(selection, &path, &meta, decision, options, &mut scan, &mut jobs);
            let descend = bit == ftype::DIR
                && match decision {
                    // An equals match is walked too (AIDE 0.18.5's fix, in Debian's 0.18.3):
                    // what is below it is selected by the rules of its own, if any.
                    Decision::Selective(_) | Decision::Equal(_) | Decision::Partial => true,
                    Decision::None => selection.is_node(bytes),
                };
            if !descend {
                continue;
            }
            if meta.dev() != dir_dev
                && !options.pseudo_filesystems
                && crate::sys::is_pseudo_filesystem(&path).unwrap_or(false)
            {
                scan.skipped_pseudo.push(escape_path(bytes));
                continue;
            }
            if !walked.insert((meta.dev(), meta.ino())) {
                scan.warnings.push(format!(
                    "{}: a directory already walked (a bind mount?), not walked again",
                    escape_path(bytes)
                ));
                continue;
            }
            stack.push((path, meta.dev()));
        }
    }
    hash_all(jobs, options.threads.max(1), &mut scan);
    scan
}

fn record(
    selection: &Selection,
    path: &Path,
    meta: &std::fs::Metadata,
    decision: Decision,
    options: &ScanOptions,
    scan: &mut Scan,
    jobs: &mut Vec<HashJob>,
) {
    let (Decision::Selective(rule) | Decision::Equal(rule)) = decision else { return };
    let attrs = selection.rules()[rule].attrs;
    let key = escape_path(path.as_os_str().as_bytes());
    let entry = entry_of(path, meta, attrs, &mut scan.warnings);
    if entry.file_type == 'f' && attrs.intersects(Attrs::HASHES) {
        jobs.push(HashJob {
            key: key.clone(),
            path: path.to_path_buf(),
            attrs,
            size: meta.size(),
            dev: meta.dev(),
            ino: meta.ino(),
            prefix: options.growing.get(&key).copied().filter(|&old| meta.size() > old),
        });
    }
    scan.entries.insert(key, entry);
}

/// The hashes of one file (those its rule asks for).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hashes {
    /// Hex SHA-256.
    pub sha256: Option<String>,
    /// Hex SHA-512.
    pub sha512: Option<String>,
    /// Hex BLAKE3.
    pub blake3: Option<String>,
}

/// The hashers a rule asks for, fed together.
#[derive(Clone)]
struct Hashers {
    sha256: Option<sha2::Sha256>,
    sha512: Option<sha2::Sha512>,
    blake3: Option<blake3::Hasher>,
}

impl Hashers {
    fn new(attrs: Attrs) -> Hashers {
        Hashers {
            sha256: attrs.contains(Attrs::SHA256).then(sha2::Sha256::new),
            sha512: attrs.contains(Attrs::SHA512).then(sha2::Sha512::new),
            blake3: attrs.contains(Attrs::BLAKE3).then(blake3::Hasher::new),
        }
    }

    fn update(&mut self, chunk: &[u8]) {
        if let Some(h) = self.sha256.as_mut() {
            h.update(chunk);
        }
        if let Some(h) = self.sha512.as_mut() {
            h.update(chunk);
        }
        if let Some(h) = self.blake3.as_mut() {
            h.update(chunk);
        }
    }

    fn finish(self) -> Hashes {
        Hashes {
            sha256: self.sha256.map(|h| hex::encode(h.finalize())),
            sha512: self.sha512.map(|h| hex::encode(h.finalize())),
            blake3: self.blake3.map(|h| h.finalize().to_hex().to_string()),
        }
    }
}

fn hash_all(mut jobs: Vec<HashJob>, threads: usize, scan: &mut Scan) {
    // Largest first, so one big file does not start last and finish alone.
    jobs.sort_by_key(|job| std::cmp::Reverse(job.size));
    let next = AtomicUsize::new(0);
    type Hashed = Result<(Hashes, Option<Hashes>), String>;
    let results: Mutex<Vec<(usize, Hashed)>> = Mutex::new(Vec::with_capacity(jobs.len()));
    let threads = threads.min(jobs.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buffer = vec![0u8; READ_CHUNK];
                let mut mine = Vec::new();
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(index) else { break };
                    mine.push((index, hash_file(job, &mut buffer)));
                }
                results.lock().unwrap_or_else(|p| p.into_inner()).extend(mine);
            });
        }
    });
    for (index, result) in results.into_inner().unwrap_or_else(|p| p.into_inner()) {
        let job = &jobs[index];
        match result {
            Ok((h, prefix)) => {
                if let Some(entry) = scan.entries.get_mut(&job.key) {
                    entry.sha256 = h.sha256;
                    entry.sha512 = h.sha512;
                    entry.blake3 = h.blake3;
                }
                if let Some(prefix) = prefix {
                    scan.prefix_hashes.insert(job.key.clone(), prefix);
                }
            }
            Err(e) => scan.warnings.push(format!("{}: cannot hash: {e}", job.key)),
        }
    }
}

/// The file's hashes, and those of its first `job.prefix` bytes when asked.
fn hash_file(job: &HashJob, buffer: &mut [u8]) -> Result<(Hashes, Option<Hashes>), String> {
    let mut file = crate::sys::open_read_nofollow(&job.path).map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() || meta.dev() != job.dev || meta.ino() != job.ino {
        return Err("replaced while the scan ran".into());
    }
    let mut hashers = Hashers::new(job.attrs);
    let mut prefix_left = job.prefix;
    let mut prefix = None;
    loop {
        let n = match file.read(buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string()),
        };
        let mut chunk = &buffer[..n];
        if let Some(left) = prefix_left {
            let head = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
            hashers.update(&chunk[..head]);
            chunk = &chunk[head..];
            let left = left - head as u64;
            prefix_left = Some(left);
            if left == 0 {
                prefix = Some(hashers.clone().finish());
                prefix_left = None;
            }
        }
        hashers.update(chunk);
    }
    Ok((hashers.finish(), prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_paths_stay_distinct() {
        assert_eq!(escape_path(b"/etc/passwd"), "/etc/passwd");
        assert_eq!(escape_path(b"/a\\b"), "/a\\\\b");
        assert_eq!(escape_path(b"/a\xffb"), "/a\\xffb");
        assert_ne!(escape_path(b"/a\xffb"), escape_path(b"/a\\xffb"));
        assert_eq!(escape_path("/é".as_bytes()), "/é");
    }
}

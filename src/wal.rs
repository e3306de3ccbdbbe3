//! Reading SQLite's write-ahead log before SQLite does, to notice damage it would hide.
//!
//! When SQLite opens a database it replays the WAL up to the first frame whose checksum
//! or salt does not match and silently treats the rest as never written. That is right for
//! a torn last write (a commit that was never acknowledged), but a damaged frame in the
//! middle of the log also drops every later commit, and those were acknowledged: jobs
//! would vanish without a word. So before opening, the store walks the log itself
//! (format: <https://www.sqlite.org/fileformat2.html#walformat>): if frames of the current
//! log generation (same salts as the header) follow a frame that fails its checksum, later
//! committed changes would be lost, and the store refuses to start unless told to salvage.

use std::path::Path;

/// Size of the WAL header and of each frame header, in bytes.
const WAL_HEADER: usize = 32;
const FRAME_HEADER: usize = 24;
/// Magic numbers: checksums in little-endian (…682) or big-endian (…683) word order.
const MAGIC_LE: u32 = 0x377f_0682;
const MAGIC_BE: u32 = 0x377f_0683;

/// What a walk over a WAL file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalReport {
    /// Frames that SQLite will replay (their checksums chain from the header).
    pub valid_frames: u64,
    /// Of those, frames that end a transaction (commit frames).
    pub valid_commits: u64,
    /// The first frame (0-based) that fails its checksum while carrying the current salts.
    pub damaged_frame: Option<u64>,
    /// Commit frames of the current generation after the damaged one: committed
    /// transactions SQLite would drop.
    pub commits_lost: u64,
}

impl WalReport {
    /// Whether replaying this log would lose committed transactions.
    pub fn loses_commits(&self) -> bool {
        self.commits_lost > 0
    }
}

/// Walks the WAL in `bytes`. Returns `None` when there is no usable header (an empty or
/// reset log, which SQLite ignores as a whole and which holds nothing committed).
pub fn inspect(bytes: &[u8]) -> Option<WalReport> {
    let header = bytes.get(..WAL_HEADER)?;
    let big_endian = match be32(header, 0) {
        MAGIC_LE => false,
        MAGIC_BE => true,
        _ => return None,
    };
    let page_size = match be32(header, 8) {
        1 => 65_536,
        n if n.is_power_of_two() && (512..=32_768).contains(&n) => n as usize,
        _ => return None,
    };
    let salts = (be32(header, 16), be32(header, 20));
    let mut sum = checksum((0, 0), &header[..24], big_endian);
    if sum != (be32(header, 24), be32(header, 28)) {
        // SQLite ignores a log whose header is damaged: nothing of it is replayed, so
        // every commit in it is lost.
        let commits_lost = frames(bytes, page_size).filter(|f| f.salts == salts && f.commit).count() as u64;
        return Some(WalReport { valid_frames: 0, valid_commits: 0, damaged_frame: Some(0), commits_lost });
    }
    let mut report = WalReport { valid_frames: 0, valid_commits: 0, damaged_frame: None, commits_lost: 0 };
    let mut intact = true;
    for (index, frame) in frames(bytes, page_size).enumerate() {
        if frame.salts != salts {
            // A frame of an earlier generation: the log was reset and this is where the
            // new one ends. Later frames of the current generation cannot follow.
            break;
        }
        if intact {
            let next = checksum(checksum(sum, &frame.header[..8], big_endian), frame.page, big_endian);
            if next == frame.stored_sum {
                sum = next;
                report.valid_frames += 1;
                report.valid_commits += u64::from(frame.commit);
                continue;
            }
            intact = false;
            report.damaged_frame = Some(index as u64);
            // The damaged frame itself may be a torn write: the last transaction, cut
            // short by a crash before it was acknowledged. Only commits after it prove
            // that acknowledged work lies beyond the damage.
            continue;
        }
        report.commits_lost += u64::from(frame.commit);
    }
    Some(report)
}

/// Inspects the WAL file at `path`, if there is one with a header.
pub fn inspect_file(path: &Path) -> std::io::Result<Option<WalReport>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(inspect(&bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Size of one copy of the WAL-index header at the start of the `-shm` file.
const INDEX_HEADER: usize = 48;
/// The WAL-index format SQLite has written since 3.7.0.
const INDEX_VERSION: u32 = 3_007_000;

/// How many frames the log holds, from the WAL-index header at the start of the `-shm`
/// file (<https://www.sqlite.org/walformat.html#the_wal_index_file_format>): its
/// `mxFrame`, the last valid frame. SQLite keeps two copies of the header and writes
/// them one after the other, so `None` when they differ (read while being written) or the
/// index is not initialized. This is how much of the WAL file is in use: the file itself
/// keeps its size (the store writes it ahead, and SQLite reuses it from the start).
pub fn frames_in_log(shm: &[u8]) -> Option<u32> {
    let first = shm.get(..INDEX_HEADER)?;
    if shm.get(INDEX_HEADER..2 * INDEX_HEADER)? != first {
        return None;
    }
    // The index is in the machine's byte order.
    let word = |at: usize| u32::from_ne_bytes([first[at], first[at + 1], first[at + 2], first[at + 3]]);
    (word(0) == INDEX_VERSION && first[12] == 1).then(|| word(16))
}

struct Frame<'a> {
    header: &'a [u8],
    page: &'a [u8],
    salts: (u32, u32),
    stored_sum: (u32, u32),
    /// A commit frame records the database size in pages after the commit (non-zero).
    commit: bool,
}

/// The whole frames after the header (a partial frame at the end is a torn write).
fn frames(bytes: &[u8], page_size: usize) -> impl Iterator<Item = Frame<'_>> {
    bytes.get(WAL_HEADER..).unwrap_or_default().chunks_exact(FRAME_HEADER + page_size).map(|chunk| {
        let (header, page) = chunk.split_at(FRAME_HEADER);
        Frame {
            header,
            page,
            salts: (be32(header, 8), be32(header, 12)),
            stored_sum: (be32(header, 16), be32(header, 20)),
            commit: be32(header, 4) != 0,
        }
    })
}

fn be32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// SQLite's WAL checksum: pairs of 32-bit words folded into two running sums.
fn checksum(seed: (u32, u32), data: &[u8], big_endian: bool) -> (u32, u32) {
    let (mut s0, mut s1) = seed;
    for pair in data.chunks_exact(8) {
        let word = |at: usize| {
            let b = [pair[at], pair[at + 1], pair[at + 2], pair[at + 3]];
            if big_endian {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            }
        };
        s0 = s0.wrapping_add(word(0)).wrapping_add(s1);
        s1 = s1.wrapping_add(word(4)).wrapping_add(s0);
    }
    (s0, s1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a log of `commits` one-frame transactions, as SQLite writes it.
    fn log(commits: u32, page_size: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC_LE.to_be_bytes());
        bytes.extend_from_slice(&3_007_000u32.to_be_bytes());
        bytes.extend_from_slice(&(page_size as u32).to_be_bytes());
        bytes.extend_from_slice(&0u32.to_be_bytes());
        bytes.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        bytes.extend_from_slice(&0x9abc_def0u32.to_be_bytes());
        let mut sum = checksum((0, 0), &bytes, false);
        bytes.extend_from_slice(&sum.0.to_be_bytes());
        bytes.extend_from_slice(&sum.1.to_be_bytes());
        for n in 0..commits {
            let mut header = Vec::new();
            header.extend_from_slice(&(n + 1).to_be_bytes());
            header.extend_from_slice(&(n + 1).to_be_bytes());
            let page = vec![n as u8; page_size];
            sum = checksum(checksum(sum, &header, false), &page, false);
            header.extend_from_slice(&0x1234_5678u32.to_be_bytes());
            header.extend_from_slice(&0x9abc_def0u32.to_be_bytes());
            header.extend_from_slice(&sum.0.to_be_bytes());
            header.extend_from_slice(&sum.1.to_be_bytes());
            bytes.extend_from_slice(&header);
            bytes.extend_from_slice(&page);
        }
        bytes
    }

    #[test]
    fn zeros_written_ahead_of_the_log_are_not_damage() {
        let mut bytes = log(5, 512);
        bytes.resize(bytes.len() + 64 * (FRAME_HEADER + 512) + 100, 0);
        let report = inspect(&bytes).expect("header");
        assert_eq!(report, WalReport { valid_frames: 5, valid_commits: 5, damaged_frame: None, commits_lost: 0 });
        assert_eq!(inspect(&vec![0; 4096]), None, "a log of zeros holds nothing");
    }

    /// The frame count read from a real SQLite index is the one SQLite reports.
    #[test]
    fn frames_in_log_agrees_with_sqlite() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("t.db");
        let conn = rusqlite::Connection::open(&db).expect("open");
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0; CREATE TABLE t (x BLOB);")
            .expect("schema");
        for i in 0..20 {
            conn.execute("INSERT INTO t VALUES (?1)", [vec![i as u8; 3000]]).expect("insert");
        }
        let shm = std::fs::read(dir.path().join("t.db-shm")).expect("read -shm");
        let (_, in_log, _): (i64, i64, i64) = conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .expect("checkpoint");
        assert!(in_log > 20, "{in_log} frames");
        assert_eq!(frames_in_log(&shm), Some(in_log as u32));
        let mut torn = shm.clone();
        torn[16] ^= 1;
        assert_eq!(frames_in_log(&torn), None, "copies that differ are not read");
        assert_eq!(frames_in_log(&shm[..60]), None);
    }

    #[test]
    fn an_intact_log_loses_nothing() {
        let report = inspect(&log(5, 512)).expect("header");
        assert_eq!(report, WalReport { valid_frames: 5, valid_commits: 5, damaged_frame: None, commits_lost: 0 });
    }

    #[test]
    fn damage_in_the_middle_loses_the_later_commits() {
        let mut bytes = log(5, 512);
        bytes[WAL_HEADER + 2 * (FRAME_HEADER + 512) + FRAME_HEADER + 100] ^= 0xff;
        let report = inspect(&bytes).expect("header");
        assert_eq!(report.valid_frames, 2);
        assert_eq!(report.damaged_frame, Some(2));
        assert_eq!(report.commits_lost, 2);
        assert!(report.loses_commits());
    }

    #[test]
    fn a_torn_last_frame_is_not_damage() {
        let mut bytes = log(5, 512);
        bytes.truncate(bytes.len() - 100);
        let report = inspect(&bytes).expect("header");
        assert_eq!((report.valid_frames, report.commits_lost), (4, 0));
    }

    #[test]
    fn a_damaged_last_frame_may_be_a_torn_write() {
        let mut bytes = log(3, 512);
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let report = inspect(&bytes).expect("header");
        assert_eq!((report.valid_frames, report.damaged_frame, report.commits_lost), (2, Some(2), 0));
        assert!(!report.loses_commits());
    }

    #[test]
    fn frames_of_an_earlier_generation_end_the_log() {
        let mut bytes = log(4, 512);
        // Frames 2 and 3 carry other salts: left over from before a log reset.
        for frame in 2..4 {
            let at = WAL_HEADER + frame * (FRAME_HEADER + 512) + 8;
            bytes[at] ^= 0xff;
        }
        let report = inspect(&bytes).expect("header");
        assert_eq!((report.valid_frames, report.damaged_frame, report.commits_lost), (2, None, 0));
    }

    #[test]
    fn no_header_no_report() {
        assert_eq!(inspect(&[]), None);
        assert_eq!(inspect(&[0u8; 64]), None);
    }
}

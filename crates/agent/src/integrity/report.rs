//! Compares a baseline with a scan, and writes the comparison as the JSON report a job's
//! `data` carries: counts, then the entries added, removed and changed (each changed
//! attribute with its old and new value), capped in number and in bytes with an explicit
//! count of what was left out.

use super::attrs::Attrs;
use super::scan::{Entry, Hashes};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};

/// One changed attribute.
#[derive(Debug, Clone, PartialEq)]
pub struct AttrChange {
    /// AIDE's JSON name of the attribute (`perm`, `uid`, `sha256`, ...).
    pub name: &'static str,
    /// Its baseline value.
    pub old: Value,
    /// Its value now.
    pub new: Value,
}

/// What differs between a baseline and the files.
#[derive(Debug, Default)]
pub struct Diff {
    /// Entries selected now and absent from the baseline.
    pub added: Vec<(String, Entry)>,
    /// Entries of the baseline no longer there (or no longer selected).
    pub removed: Vec<(String, Entry)>,
    /// Entries in both whose attributes differ.
    pub changed: Vec<(String, Vec<AttrChange>)>,
}

impl Diff {
    /// AIDE's exit status bits: 1 added, 2 removed, 4 changed; 0 when clean.
    pub fn status_bits(&self) -> u32 {
        u32::from(!self.added.is_empty())
            | u32::from(!self.removed.is_empty()) << 1
            | u32::from(!self.changed.is_empty()) << 2
    }

    /// Whether nothing differs.
    pub fn is_clean(&self) -> bool {
        self.status_bits() == 0
    }
}

fn perm_text(perm: u32) -> String {
    format!("{perm:04o}")
}

/// The attributes compared, in report order, each with how to read it from an entry.
fn attribute_values(entry: &Entry) -> [(&'static str, Attrs, Value); 15] {
    let v = |o: Option<u64>| o.map_or(Value::Null, Value::from);
    let t = |o: Option<i64>| o.map_or(Value::Null, Value::from);
    let s = |o: &Option<String>| o.as_ref().map_or(Value::Null, |x| Value::from(x.as_str()));
    [
        ("file_type", Attrs::FTYPE, Value::from(entry.file_type.to_string())),
        ("perm", Attrs::PERM, entry.perm.map_or(Value::Null, |p| Value::from(perm_text(p)))),
        ("uid", Attrs::UID, v(entry.uid.map(u64::from))),
        ("gid", Attrs::GID, v(entry.gid.map(u64::from))),
        ("size", Attrs::SIZE, v(entry.size)),
        ("block_count", Attrs::BCOUNT, v(entry.block_count)),
        ("access_time", Attrs::ATIME, t(entry.access_time)),
        ("modify_time", Attrs::MTIME, t(entry.modify_time)),
        ("change_time", Attrs::CTIME, t(entry.change_time)),
        ("inode", Attrs::INODE, v(entry.inode)),
        ("link_count", Attrs::LCOUNT, v(entry.link_count)),
        ("link_name", Attrs::LNAME, s(&entry.link_name)),
        ("sha256", Attrs::SHA256, s(&entry.sha256)),
        ("sha512", Attrs::SHA512, s(&entry.sha512)),
        ("blake3", Attrs::BLAKE3, s(&entry.blake3)),
    ]
}

/// Attributes a growing file may see increase without it being a change.
const GROWS: &[&str] = &["size", "block_count", "access_time", "modify_time", "change_time"];

/// The attribute changes between `old` and `new` of one path, `ignore` left out.
/// `prefix` holds the hashes of `new`'s first `old.size` bytes when it is a growing file
/// that grew: a hash whose prefix equals the old one is an append, not a change.
pub fn changes(old: &Entry, new: &Entry, ignore: Attrs, prefix: Option<&Hashes>) -> Vec<AttrChange> {
    // Compared: what both rules select (as AIDE, a rule edited to drop an attribute
    // stops comparing it).
    let both = old.attrs.and(new.attrs).without(ignore);
    let growing = old.attrs.and(new.attrs).contains(Attrs::GROWING);
    let mut out = Vec::new();
    for ((name, bit, old_value), (_, _, new_value)) in attribute_values(old).into_iter().zip(attribute_values(new)) {
        if !both.contains(bit) || old_value == new_value {
            continue;
        }
        if growing && GROWS.contains(&name) {
            if let (Some(o), Some(n)) = (old_value.as_i64(), new_value.as_i64()) {
                if n > o {
                    continue;
                }
            }
        }
        if growing {
            let head = prefix.and_then(|p| match name {
                "sha256" => p.sha256.as_deref(),
                "sha512" => p.sha512.as_deref(),
                "blake3" => p.blake3.as_deref(),
                _ => None,
            });
            if head.is_some() && head == old_value.as_str() {
                continue;
            }
        }
        out.push(AttrChange { name, old: old_value, new: new_value });
    }
    out
}

/// Compares `old` (the baseline) with `new` (the scan); `prefixes` are the scan's
/// prefix hashes of growing files that grew.
pub fn diff(
    old: &BTreeMap<String, Entry>,
    new: &BTreeMap<String, Entry>,
    ignore: Attrs,
    prefixes: &HashMap<String, Hashes>,
) -> Diff {
    let mut d = Diff::default();
    for (path, entry) in new {
        match old.get(path) {
            None if !entry.attrs.contains(Attrs::ANF) => d.added.push((path.clone(), entry.clone())),
            None => {}
            Some(before) => {
                let c = changes(before, entry, ignore, prefixes.get(path));
                if !c.is_empty() {
                    d.changed.push((path.clone(), c));
                }
            }
        }
    }
    for (path, entry) in old {
        if !new.contains_key(path) && !entry.attrs.contains(Attrs::ARF) {
            d.removed.push((path.clone(), entry.clone()));
        }
    }
    d
}

fn entry_json(path: &str, entry: &Entry) -> Value {
    json!({"path": path, "type": entry.file_type.to_string()})
}

fn changed_json(path: &str, changes: &[AttrChange]) -> Value {
    let mut attributes = Map::new();
    for c in changes {
        attributes.insert(c.name.to_string(), json!({"old": c.old, "new": c.new}));
    }
    json!({"path": path, "attributes": Value::Object(attributes)})
}

/// How many of each list to show at most `max` entries in all: a fair share each, what a
/// short list leaves over going to the others, so many additions never hide a change.
fn shares(lens: [usize; 3], max: usize) -> [usize; 3] {
    let mut shown = [0usize; 3];
    let mut left = max;
    loop {
        let wanting: Vec<usize> = (0..3).filter(|&i| shown[i] < lens[i]).collect();
        if wanting.is_empty() || left == 0 {
            return shown;
        }
        let each = (left / wanting.len()).max(1);
        for i in wanting {
            let take = each.min(lens[i] - shown[i]).min(left);
            shown[i] += take;
            left -= take;
        }
    }
}

/// The parts of a report besides the entry lists.
pub struct ReportHead {
    /// `integrity.init`, `integrity.check` or `integrity.update`.
    pub method: &'static str,
    /// Entries scanned now.
    pub total: usize,
    /// Facts about the baseline compared with (or written).
    pub baseline: Value,
    /// Warnings: unreadable files, notes on the rules, skipped pseudo-filesystems.
    pub warnings: Vec<String>,
}

/// At most this many warnings are listed.
const MAX_WARNINGS: usize = 50;

/// The report as JSON text, with at most `max_entries` entries and, escaped as a JSON
/// string (how it travels inside the result), at most `max_bytes` bytes.
pub fn render(head: &ReportHead, diff: &Diff, max_entries: usize, max_bytes: usize) -> String {
    let lens = [diff.added.len(), diff.removed.len(), diff.changed.len()];
    let mut limit = max_entries;
    loop {
        let text = render_with(head, diff, shares(lens, limit));
        let escaped = serde_json::to_string(&text).map_or(usize::MAX, |s| s.len());
        if escaped <= max_bytes || limit == 0 {
            return text;
        }
        // Cut by the share of the excess, and at least by one.
        let keep = (limit as u128 * max_bytes as u128 / escaped as u128) as usize;
        limit = keep.min(limit - 1) * 9 / 10;
    }
}

fn render_with(head: &ReportHead, diff: &Diff, shown: [usize; 3]) -> String {
    let added: Vec<Value> = diff.added.iter().take(shown[0]).map(|(p, e)| entry_json(p, e)).collect();
    let removed: Vec<Value> = diff.removed.iter().take(shown[1]).map(|(p, e)| entry_json(p, e)).collect();
    let changed: Vec<Value> = diff.changed.iter().take(shown[2]).map(|(p, c)| changed_json(p, c)).collect();
    let omitted = [diff.added.len() - shown[0], diff.removed.len() - shown[1], diff.changed.len() - shown[2]];
    let omitted_total: usize = omitted.iter().sum();
    let mut report = json!({
        "method": head.method,
        "summary": {
            "total": head.total,
            "added": diff.added.len(),
            "removed": diff.removed.len(),
            "changed": diff.changed.len(),
        },
        "baseline": head.baseline,
        "added": added,
        "removed": removed,
        "changed": changed,
    });
    if omitted_total > 0 {
        report["omitted"] = json!({
            "added": omitted[0],
            "removed": omitted[1],
            "changed": omitted[2],
            "more": format!("{omitted_total} more entries not listed"),
        });
    }
    if !head.warnings.is_empty() {
        let mut warnings: Vec<Value> =
            head.warnings.iter().take(MAX_WARNINGS).map(|w| Value::from(w.as_str())).collect();
        if head.warnings.len() > MAX_WARNINGS {
            warnings.push(Value::from(format!("{} more warnings not listed", head.warnings.len() - MAX_WARNINGS)));
        }
        report["warnings"] = Value::Array(warnings);
    }
    report.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(perm: u32, sha: &str) -> Entry {
        Entry {
            attrs: Attrs::PERM.with(Attrs::SHA256).with(Attrs::FTYPE),
            file_type: 'f',
            perm: Some(perm),
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
            sha256: Some(sha.into()),
            sha512: None,
            blake3: None,
        }
    }

    #[test]
    fn each_changed_attribute_is_named() {
        let old = BTreeMap::from([("/a".to_string(), file(0o644, "x")), ("/gone".to_string(), file(0o644, "y"))]);
        let new = BTreeMap::from([("/a".to_string(), file(0o600, "z")), ("/new".to_string(), file(0o644, "y"))]);
        let d = diff(&old, &new, Attrs::EMPTY, &HashMap::new());
        assert_eq!(d.status_bits(), 7);
        let names: Vec<&str> = d.changed[0].1.iter().map(|c| c.name).collect();
        assert_eq!(names, ["perm", "sha256"]);
        assert_eq!(d.changed[0].1[0].old, Value::from("0644"));
        assert!(diff(&old, &new, Attrs::PERM, &HashMap::new()).changed[0].1.iter().all(|c| c.name != "perm"));
    }

    #[test]
    fn the_cap_says_how_many_more() {
        let old = BTreeMap::new();
        let new: BTreeMap<String, Entry> = (0..5000).map(|i| (format!("/f{i:05}"), file(0o644, "x"))).collect();
        let d = diff(&old, &new, Attrs::EMPTY, &HashMap::new());
        let head = ReportHead { method: "integrity.check", total: 5000, baseline: Value::Null, warnings: vec![] };
        let report: Value = serde_json::from_str(&render(&head, &d, 100, 60_000)).expect("json");
        assert_eq!(report["added"].as_array().map(Vec::len), Some(100));
        assert_eq!(report["summary"]["added"], 5000);
        assert_eq!(report["omitted"]["added"], 4900);
        assert_eq!(report["omitted"]["more"], "4900 more entries not listed");
        // The byte cap wins over the entry cap.
        let text = render(&head, &d, 5000, 20_000);
        assert!(serde_json::to_string(&text).expect("json").len() <= 20_000);
        let report: Value = serde_json::from_str(&text).expect("json");
        let listed = report["added"].as_array().map_or(0, Vec::len);
        assert!(listed > 0 && listed < 5000);
        assert_eq!(report["omitted"]["added"], 5000 - listed);
    }

    #[test]
    fn shares_are_fair() {
        assert_eq!(shares([5000, 2, 10], 100), [88, 2, 10]);
        assert_eq!(shares([0, 0, 0], 100), [0, 0, 0]);
        assert_eq!(shares([50, 50, 50], 30), [10, 10, 10]);
    }
}

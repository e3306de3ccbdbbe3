//! The file attributes an integrity rule can select, and their aide.conf names.
//!
//! Attribute and group names are AIDE 0.18's; the report uses AIDE's JSON names
//! (`perm`, `uid`, `modify_time`, `link_name`, ...) so the two tools' reports read alike.

use serde::{Deserialize, Serialize};

/// A set of attributes (a bit per attribute).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Attrs(pub u32);

impl Attrs {
    /// File type (`ftype`).
    pub const FTYPE: Attrs = Attrs(1 << 0);
    /// Permission bits (`p`).
    pub const PERM: Attrs = Attrs(1 << 1);
    /// Owner uid (`u`).
    pub const UID: Attrs = Attrs(1 << 2);
    /// Group gid (`g`).
    pub const GID: Attrs = Attrs(1 << 3);
    /// Size (`s`).
    pub const SIZE: Attrs = Attrs(1 << 4);
    /// Block count (`b`).
    pub const BCOUNT: Attrs = Attrs(1 << 5);
    /// Access time (`a`).
    pub const ATIME: Attrs = Attrs(1 << 6);
    /// Modification time (`m`).
    pub const MTIME: Attrs = Attrs(1 << 7);
    /// Inode change time (`c`).
    pub const CTIME: Attrs = Attrs(1 << 8);
    /// Inode number (`i`).
    pub const INODE: Attrs = Attrs(1 << 9);
    /// Link count (`n`).
    pub const LCOUNT: Attrs = Attrs(1 << 10);
    /// Symlink target (`l`).
    pub const LNAME: Attrs = Attrs(1 << 11);
    /// SHA-256 of the content (`sha256`).
    pub const SHA256: Attrs = Attrs(1 << 12);
    /// SHA-512 of the content (`sha512`).
    pub const SHA512: Attrs = Attrs(1 << 13);
    /// BLAKE3 of the content (`blake3`).
    pub const BLAKE3: Attrs = Attrs(1 << 14);
    /// Growing file (`growing`, or `S` = `s+growing`): a larger size and later times are
    /// not changes, nor is a hash whose first old-size bytes hash as before.
    pub const GROWING: Attrs = Attrs(1 << 15);
    /// Allow new files (`ANF`): added entries are not reported.
    pub const ANF: Attrs = Attrs(1 << 16);
    /// Allow removed files (`ARF`): removed entries are not reported.
    pub const ARF: Attrs = Attrs(1 << 17);

    /// No attribute.
    pub const EMPTY: Attrs = Attrs(0);
    /// The content hashes.
    pub const HASHES: Attrs = Attrs(Self::SHA256.0 | Self::SHA512.0 | Self::BLAKE3.0);

    /// Whether every attribute of `other` is in `self`.
    pub fn contains(self, other: Attrs) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether `self` and `other` share an attribute.
    pub fn intersects(self, other: Attrs) -> bool {
        self.0 & other.0 != 0
    }

    /// `self` with `other` added.
    pub fn with(self, other: Attrs) -> Attrs {
        Attrs(self.0 | other.0)
    }

    /// `self` without `other`.
    pub fn without(self, other: Attrs) -> Attrs {
        Attrs(self.0 & !other.0)
    }

    /// The attributes in both.
    pub fn and(self, other: Attrs) -> Attrs {
        Attrs(self.0 & other.0)
    }

    /// The attribute names in `self`, as aide.conf writes them, joined with `+`.
    pub fn describe(self) -> String {
        let names: Vec<&str> = ATTRIBUTES.iter().filter(|(_, a)| self.contains(*a)).map(|(n, _)| *n).collect();
        if names.is_empty() {
            "E".into()
        } else {
            names.join("+")
        }
    }
}

/// The attributes by their aide.conf name.
pub const ATTRIBUTES: &[(&str, Attrs)] = &[
    ("ftype", Attrs::FTYPE),
    ("p", Attrs::PERM),
    ("u", Attrs::UID),
    ("g", Attrs::GID),
    ("s", Attrs::SIZE),
    ("b", Attrs::BCOUNT),
    ("a", Attrs::ATIME),
    ("m", Attrs::MTIME),
    ("c", Attrs::CTIME),
    ("i", Attrs::INODE),
    ("n", Attrs::LCOUNT),
    ("l", Attrs::LNAME),
    ("sha256", Attrs::SHA256),
    ("sha512", Attrs::SHA512),
    ("blake3", Attrs::BLAKE3),
    ("growing", Attrs::GROWING),
    ("ANF", Attrs::ANF),
    ("ARF", Attrs::ARF),
];

/// Names AIDE knows that select something this agent does not record. Hashes it does not
/// compute are replaced by SHA-256, so a rule asking for `md5` still checks content; the
/// extended attributes (ACLs, SELinux labels, xattrs, ext2 flags, capabilities) and
/// AIDE's rename tracking are accepted and not checked (docs/DISPATCH.md lists them).
pub const SUBSTITUTED_HASHES: &[&str] =
    &["md5", "sha1", "rmd160", "tiger", "crc32", "crc32b", "haval", "gost", "whirlpool", "stribog256", "stribog512"];
/// See [`SUBSTITUTED_HASHES`].
pub const UNCHECKED: &[&str] = &["acl", "selinux", "xattrs", "e2fsattrs", "caps", "I", "compressed", "X"];

/// The value of one built-in name: an attribute, a default group (`R`, `L`, `>`, `H`,
/// `E`, `S`), or one of the names AIDE knows that this agent maps or does not check.
pub fn builtin(name: &str) -> Option<Attrs> {
    if let Some((_, a)) = ATTRIBUTES.iter().find(|(n, _)| *n == name) {
        return Some(*a);
    }
    let a = |list: &[Attrs]| list.iter().fold(Attrs::EMPTY, |acc, x| acc.with(*x));
    use Attrs as A;
    Some(match name {
        // AIDE's R includes md5, which is replaced by SHA-256 here.
        "R" => a(&[
            A::PERM,
            A::FTYPE,
            A::INODE,
            A::LNAME,
            A::LCOUNT,
            A::UID,
            A::GID,
            A::SIZE,
            A::MTIME,
            A::CTIME,
            A::SHA256,
        ]),
        "L" => a(&[A::PERM, A::FTYPE, A::INODE, A::LNAME, A::LCOUNT, A::UID, A::GID]),
        ">" => a(&[A::PERM, A::FTYPE, A::LNAME, A::UID, A::GID, A::INODE, A::LCOUNT, A::SIZE, A::GROWING]),
        "H" => Attrs::HASHES,
        "E" => Attrs::EMPTY,
        "S" => A::SIZE.with(A::GROWING),
        n if SUBSTITUTED_HASHES.contains(&n) => A::SHA256,
        n if UNCHECKED.contains(&n) => Attrs::EMPTY,
        _ => return None,
    })
}

//! Parses integrity rules written in `aide.conf` syntax (AIDE 0.18), so an existing AIDE
//! rule file can be pointed at as it is.
//!
//! Supported: comments (whole-line and inline `#`), selection lines (`/etc R`), negative
//! (`!/etc/mtab$`) and equals (`=/boot/ R`) lines with optional file-type restrictions
//! (`/run d,f R`), attribute expressions over attributes and groups (`p+u+g-m`), group
//! definitions (`Mine = p+u+g+sha256`), `@@define`/`@@undef`/`@@{VAR}` (with `HOSTNAME`
//! predefined), `@@if`/`@@ifdef`/`@@ifndef`/`@@ifhost`/`@@ifnhost`/`@@else`/`@@endif`,
//! `@@include FILE` and `@@include DIR REGEX` (and `@@x_include` of files that are not
//! executable: the agent runs no programs), and AIDE's options: the ones that change
//! what is compared (`report_ignore_changed_attrs`, `num_workers`) are used, the others
//! (databases, report URLs and formats, logging, gzip) are accepted and ignored, because
//! the agent keeps its own signed baseline and answers in JSON. Anything else is an error
//! naming the file, the line number and its text.

use super::attrs::{self, Attrs};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Why a rules file was refused.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// A line that is not valid aide.conf (or uses what the agent does not support).
    #[error("{file}:{line}: {reason} (line: {text:?})")]
    Syntax {
        /// The file the line is in.
        file: String,
        /// Its 1-based number.
        line: usize,
        /// The line as written.
        text: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A rules file (or an included one) could not be read.
    #[error("cannot read rules file {file}: {source}")]
    Read {
        /// The file.
        file: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Which kind of selection line a rule is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleKind {
    /// `/path attrs`: the path and, for directories, everything below.
    Selective,
    /// `=/path attrs`: the path, not what is below it (below it only with a trailing `/`).
    Equals,
    /// `!/path`: not the path nor anything below it.
    Negative,
}

/// File types, as restriction letters (`f d l c b p s`).
pub mod ftype {
    /// Regular file.
    pub const FILE: u8 = 1;
    /// Directory.
    pub const DIR: u8 = 2;
    /// Symbolic link.
    pub const LINK: u8 = 4;
    /// Character device.
    pub const CHAR: u8 = 8;
    /// Block device.
    pub const BLOCK: u8 = 16;
    /// FIFO.
    pub const FIFO: u8 = 32;
    /// Unix socket.
    pub const SOCKET: u8 = 64;

    /// The restriction bit of a letter.
    pub fn from_letter(c: char) -> Option<u8> {
        Some(match c {
            'f' => FILE,
            'd' => DIR,
            'l' => LINK,
            'c' => CHAR,
            'b' => BLOCK,
            'p' => FIFO,
            's' => SOCKET,
            _ => return None,
        })
    }

    /// The letter of a type bit, as AIDE's reports write it.
    pub fn letter(bit: u8) -> char {
        match bit {
            FILE => 'f',
            DIR => 'd',
            LINK => 'l',
            CHAR => 'c',
            BLOCK => 'b',
            FIFO => 'p',
            SOCKET => 's',
            _ => '?',
        }
    }
}

/// One selection line.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Selective, equals or negative.
    pub kind: RuleKind,
    /// The regex, as written after macro substitution and unescaping (AIDE anchors it at
    /// the start of the path).
    pub regex: String,
    /// File types the rule applies to (bits of [`ftype`]); 0 for all.
    pub restriction: u8,
    /// What to record and compare (empty for negative rules).
    pub attrs: Attrs,
    /// Where the line is, for messages: `file:line`.
    pub origin: String,
}

/// A parsed rules file.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// The selection lines, in file order.
    pub rules: Vec<Rule>,
    /// `report_ignore_changed_attrs`: changes of these are not reported.
    pub ignore_changed: Attrs,
    /// `num_workers`, if given: hashing threads when the agent's config does not say.
    pub num_workers: Option<usize>,
    /// What the file asked for that the agent does not do (unchecked attributes, hashes
    /// replaced by SHA-256), once each, for the report.
    pub notes: Vec<String>,
}

/// Options AIDE knows whose value does not change what this agent records or compares.
const IGNORED_OPTIONS: &[&str] = &[
    "database",
    "database_in",
    "database_out",
    "database_new",
    "database_attrs",
    "database_add_metadata",
    "log_level",
    "verbose",
    "gzip_dbout",
    "acl_no_symlink_follow",
    "warn_dead_symlinks",
    "config_version",
    "config_check_warn_unrestricted_rules",
    "report_url",
    "report_level",
    "report_format",
    "report_base16",
    "report_detailed_init",
    "report_quiet",
    "report_append",
    "report_grouped",
    "grouped",
    "report_summarize_changes",
    "summarize_changes",
    "report_ignore_added_attrs",
    "report_ignore_removed_attrs",
    "report_force_attrs",
    "report_ignore_e2fsattrs",
];

/// Deepest `@@include` nesting, as AIDE.
const MAX_INCLUDE_DEPTH: usize = 16;

/// Reads and parses the rules file at `path`.
pub fn load(path: &Path) -> Result<Rules, RulesError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| RulesError::Read { file: path.display().to_string(), source })?;
    parse(&text, &path.display().to_string(), path.parent())
}

/// Parses rules from `text`; `file` names it in errors, `dir` is where relative
/// `@@include`s are looked up.
pub fn parse(text: &str, file: &str, dir: Option<&Path>) -> Result<Rules, RulesError> {
    let mut parser = Parser {
        vars: HashMap::new(),
        groups: HashMap::new(),
        rules: Rules::default(),
        base_dir: dir.map(Path::to_path_buf),
    };
    parser.vars.insert("HOSTNAME".into(), hostname());
    parser.parse_text(text, file, 0)?;
    Ok(parser.rules)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().split('.').next().unwrap_or_default().to_string())
        .unwrap_or_default()
}

struct Parser {
    vars: HashMap<String, String>,
    groups: HashMap<String, Attrs>,
    rules: Rules,
    base_dir: Option<PathBuf>,
}

/// One level of `@@if` nesting.
struct Conditional {
    /// Whether the enclosing lines are in use.
    outer: bool,
    /// Whether the condition held.
    cond: bool,
    /// Whether `@@else` was seen.
    in_else: bool,
}

impl Parser {
    fn parse_text(&mut self, text: &str, file: &str, depth: usize) -> Result<(), RulesError> {
        let mut stack: Vec<Conditional> = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let number = index + 1;
            let err = |reason: String| RulesError::Syntax { file: file.into(), line: number, text: raw.into(), reason };
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let active = stack.last().is_none_or(|c| c.outer && (c.cond != c.in_else));
            if let Some(directive) = line.strip_prefix("@@") {
                let (word, rest) = split_word(directive);
                match word {
                    "if" | "ifdef" | "ifndef" | "ifhost" | "ifnhost" => {
                        let cond = if active { self.condition(word, rest).map_err(err)? } else { false };
                        stack.push(Conditional { outer: active, cond, in_else: false });
                        continue;
                    }
                    "else" => {
                        match stack.last_mut() {
                            Some(c) if !c.in_else => c.in_else = true,
                            _ => return Err(err("@@else without @@if".into())),
                        }
                        continue;
                    }
                    "endif" => {
                        if stack.pop().is_none() {
                            return Err(err("@@endif without @@if".into()));
                        }
                        continue;
                    }
                    _ => {}
                }
                if !active {
                    continue;
                }
                match word {
                    "define" => {
                        let (name, value) = split_word(rest);
                        if !is_var_name(name) {
                            return Err(err(format!("bad variable name {name:?}")));
                        }
                        let value = self.substitute(value.trim()).map_err(err)?;
                        self.vars.insert(name.to_string(), value);
                    }
                    "undef" => {
                        self.vars.remove(rest.trim());
                    }
                    "include" | "x_include" => {
                        let args = self.substitute(rest).map_err(err)?;
                        self.include(&args, depth, word == "x_include").map_err(|e| match e {
                            IncludeError::Rules(e) => e,
                            IncludeError::Other(reason) => err(reason),
                        })?;
                    }
                    // Only the environment of executable config files, which are refused.
                    "x_include_setenv" => {}
                    _ if word.starts_with('{') => self.line(line, file, number).map_err(err)?,
                    _ => return Err(err(format!("unknown directive @@{word}"))),
                }
                continue;
            }
            if active {
                self.line(line, file, number).map_err(err)?;
            }
        }
        if !stack.is_empty() {
            return Err(RulesError::Syntax {
                file: file.into(),
                line: text.lines().count(),
                text: String::new(),
                reason: "@@if without @@endif at the end of the file".into(),
            });
        }
        Ok(())
    }

    fn condition(&self, word: &str, rest: &str) -> Result<bool, String> {
        let rest = rest.trim();
        Ok(match word {
            "ifdef" => self.vars.contains_key(rest),
            "ifndef" => !self.vars.contains_key(rest),
            "ifhost" => hostname() == rest,
            "ifnhost" => hostname() != rest,
            _ => self.bool_expr(rest)?,
        })
    }

    fn bool_expr(&self, expr: &str) -> Result<bool, String> {
        let (word, rest) = split_word(expr);
        let rest = rest.trim();
        match word {
            "not" => Ok(!self.bool_expr(rest)?),
            "defined" => Ok(self.vars.contains_key(rest)),
            "hostname" => Ok(hostname() == self.substitute(rest)?),
            "exists" => Ok(Path::new(&self.substitute(rest)?).exists()),
            other => Err(format!("unknown @@if condition {other:?} (use not, defined, hostname, exists)")),
        }
    }

    /// `@@include`; `@@x_include` when `executable_refused`: AIDE runs an executable file
    /// and reads its output, the agent runs nothing, so such a file is an error (plain
    /// files are read as by `@@include`, which is what Debian's aide.conf.d holds).
    fn include(&mut self, args: &str, depth: usize, executable_refused: bool) -> Result<(), IncludeError> {
        if depth + 1 >= MAX_INCLUDE_DEPTH {
            return Err(IncludeError::Other(format!("includes nested deeper than {MAX_INCLUDE_DEPTH}")));
        }
        let parts: Vec<&str> = args.split_whitespace().collect();
        let resolve = |p: &str| match &self.base_dir {
            Some(base) if Path::new(p).is_relative() => base.join(p),
            _ => PathBuf::from(p),
        };
        let refuse_executable = |path: &Path| -> Result<(), IncludeError> {
            use std::os::unix::fs::PermissionsExt as _;
            let executable = std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o111 != 0);
            if executable_refused && executable {
                return Err(IncludeError::Other(format!(
                    "@@x_include of {}: it is executable, and the agent runs no programs to make its rules",
                    path.display()
                )));
            }
            Ok(())
        };
        match parts.as_slice() {
            [file] => {
                let path = resolve(file);
                refuse_executable(&path)?;
                let text = std::fs::read_to_string(&path).map_err(|source| {
                    IncludeError::Rules(RulesError::Read { file: path.display().to_string(), source })
                })?;
                self.parse_text(&text, &path.display().to_string(), depth + 1).map_err(IncludeError::Rules)
            }
            [dir, pattern] => {
                let dir = resolve(dir);
                let regex = regex::Regex::new(&format!("^(?:{pattern})"))
                    .map_err(|e| IncludeError::Other(format!("bad include regex: {e}")))?;
                let entries = std::fs::read_dir(&dir).map_err(|source| {
                    IncludeError::Rules(RulesError::Read { file: dir.display().to_string(), source })
                })?;
                let mut files: Vec<PathBuf> = entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                    .filter(|e| regex.is_match(&e.file_name().to_string_lossy()))
                    .map(|e| e.path())
                    .collect();
                files.sort();
                for path in files {
                    refuse_executable(&path)?;
                    let text = std::fs::read_to_string(&path).map_err(|source| {
                        IncludeError::Rules(RulesError::Read { file: path.display().to_string(), source })
                    })?;
                    self.parse_text(&text, &path.display().to_string(), depth + 1).map_err(IncludeError::Rules)?;
                }
                Ok(())
            }
            [_, _, _] => Err(IncludeError::Other("@@include with a rule prefix is not supported".into())),
            _ => Err(IncludeError::Other("@@include takes FILE, or DIRECTORY REGEX".into())),
        }
    }

    /// Replaces `@@{VAR}` (an undefined one by nothing, as AIDE).
    fn substitute(&self, text: &str) -> Result<String, String> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(at) = rest.find("@@{") {
            out.push_str(&rest[..at]);
            let after = &rest[at + 3..];
            let end = after.find('}').ok_or("unterminated @@{")?;
            let name = &after[..end];
            if !is_var_name(name) {
                return Err(format!("bad variable name {name:?}"));
            }
            out.push_str(self.vars.get(name).map(String::as_str).unwrap_or(""));
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    /// A selection line, a group definition or an option.
    fn line(&mut self, line: &str, file: &str, number: usize) -> Result<(), String> {
        let line = strip_inline_comment(line);
        let line = self.substitute(line.trim())?;
        let line = line.trim();
        let (kind, body) = if let Some(rest) = line.strip_prefix("=/") {
            (Some(RuleKind::Equals), format!("/{rest}"))
        } else if let Some(rest) = line.strip_prefix("!/") {
            (Some(RuleKind::Negative), format!("/{rest}"))
        } else if line.starts_with('/') {
            (Some(RuleKind::Selective), line.to_string())
        } else {
            (None, line.to_string())
        };
        let Some(kind) = kind else { return self.assignment(line) };
        let words = split_escaped(&body);
        let (regex, rest) = words.split_first().ok_or("empty rule")?;
        let (restriction, expr) = match (kind, rest) {
            (RuleKind::Negative, []) => (0, None),
            (RuleKind::Negative, [r]) => (restriction(r)?, None),
            (RuleKind::Negative, _) => return Err("a negative rule takes no attributes".into()),
            (_, [e]) => (0, Some(e.as_str())),
            (_, [r, e]) => (restriction(r)?, Some(e.as_str())),
            (_, []) => return Err("a rule needs an attribute expression (e.g. R, or p+u+g+sha256)".into()),
            (_, _) => return Err("too many words: PATH [TYPES] ATTRIBUTES".into()),
        };
        let attrs = match expr {
            Some(e) => self.expression(e)?,
            None => Attrs::EMPTY,
        };
        super::select::validate_regex(regex)?;
        if regex.contains("//") {
            return Err("a rule's path may not contain //".into());
        }
        self.rules.rules.push(Rule {
            kind,
            regex: regex.clone(),
            restriction,
            attrs,
            origin: format!("{file}:{number}"),
        });
        Ok(())
    }

    /// `NAME = VALUE`: an option, or a group definition.
    fn assignment(&mut self, line: &str) -> Result<(), String> {
        let Some((name, value)) = line.split_once('=') else {
            return Err("not a rule (/PATH, !/PATH, =/PATH), a group definition or an option (NAME = VALUE)".into());
        };
        let (name, value) = (name.trim(), value.trim());
        if IGNORED_OPTIONS.contains(&name) {
            return Ok(());
        }
        match name {
            "report_ignore_changed_attrs" => {
                self.rules.ignore_changed = self.rules.ignore_changed.with(self.expression(value)?);
                Ok(())
            }
            "num_workers" => {
                let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
                let workers = match value.strip_suffix('%') {
                    Some(p) => {
                        let p: usize = p.parse().map_err(|_| format!("bad num_workers {value:?}"))?;
                        (cpus * p).div_ceil(100)
                    }
                    None => value.parse().map_err(|_| format!("bad num_workers {value:?}"))?,
                };
                if self.rules.num_workers.is_none() {
                    self.rules.num_workers = Some(workers.max(1));
                }
                Ok(())
            }
            "root_prefix" | "limit" => Err(format!("option {name} is not supported by the agent")),
            _ if name.chars().all(|c| c.is_ascii_alphanumeric()) && !name.is_empty() => {
                let attrs = self.expression(value)?;
                self.groups.insert(name.to_string(), attrs);
                Ok(())
            }
            _ => Err(format!("unknown option {name:?}")),
        }
    }

    /// An attribute expression: names joined by `+` and `-`.
    fn expression(&mut self, expr: &str) -> Result<Attrs, String> {
        let mut terms: Vec<(bool, String)> = Vec::new();
        let mut add = true;
        let mut word = String::new();
        for c in expr.chars() {
            match c {
                '+' | '-' => {
                    if word.is_empty() && !terms.is_empty() {
                        return Err(format!("empty name in attribute expression {expr:?}"));
                    }
                    if !word.is_empty() {
                        terms.push((add, std::mem::take(&mut word)));
                    }
                    add = c == '+';
                }
                c if c.is_ascii_alphanumeric() || c == '>' || c == '_' => word.push(c),
                other => return Err(format!("unexpected {other:?} in attribute expression {expr:?}")),
            }
        }
        if word.is_empty() {
            return Err(format!("attribute expression {expr:?} ends without a name"));
        }
        terms.push((add, word));
        let mut attrs = Attrs::EMPTY;
        for (add, name) in terms {
            let value = self.name(&name)?;
            attrs = if add { attrs.with(value) } else { attrs.without(value) };
        }
        Ok(attrs)
    }

    fn name(&mut self, name: &str) -> Result<Attrs, String> {
        if let Some(a) = self.groups.get(name) {
            return Ok(*a);
        }
        let value = attrs::builtin(name).ok_or_else(|| format!("unknown attribute or group {name:?}"))?;
        let note = if attrs::SUBSTITUTED_HASHES.contains(&name) {
            Some(format!("hash {name} is not computed by the agent; SHA-256 is used instead"))
        } else if attrs::UNCHECKED.contains(&name) {
            Some(format!("attribute {name} is not checked by the agent"))
        } else {
            None
        };
        if let Some(note) = note {
            if !self.rules.notes.contains(&note) {
                self.rules.notes.push(note);
            }
        }
        Ok(value)
    }
}

enum IncludeError {
    Rules(RulesError),
    Other(String),
}

fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn split_word(text: &str) -> (&str, &str) {
    let text = text.trim_start();
    match text.find(char::is_whitespace) {
        Some(i) => (&text[..i], &text[i..]),
        None => (text, ""),
    }
}

/// Drops a `#` comment that starts a word (a `#` inside a regex, e.g. `/a#b`, stays).
fn strip_inline_comment(line: &str) -> &str {
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'#' && i > 0 && (bytes[i - 1] == b' ' || bytes[i - 1] == b'\t') && !is_escaped(bytes, i - 1) {
            return &line[..i];
        }
    }
    line
}

fn is_escaped(bytes: &[u8], i: usize) -> bool {
    let backslashes = bytes[..i].iter().rev().take_while(|&&b| b == b'\\').count();
    backslashes % 2 == 1
}

/// Splits on unescaped blanks, undoing AIDE's escapes: `\ ` is a space, `\@` an `@`, `\\`
/// a backslash; any other backslash is kept (it belongs to the regex).
fn split_escaped(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.peek() {
                Some(&n @ (' ' | '@' | '\\')) => {
                    word.push(n);
                    chars.next();
                }
                _ => word.push('\\'),
            },
            ' ' | '\t' => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// A restriction list: letters joined by `,`; `0` for none.
fn restriction(text: &str) -> Result<u8, String> {
    let mut bits = 0;
    for part in text.split(',') {
        bits |= match part {
            "0" => 0,
            p if p.chars().count() == 1 => p
                .chars()
                .next()
                .and_then(ftype::from_letter)
                .ok_or_else(|| format!("unknown file type {p:?} in restriction (use f d l c b p s)"))?,
            p => return Err(format!("unknown file type {p:?} in restriction (use f d l c b p s)")),
        };
    }
    Ok(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> Rules {
        parse(text, "t.conf", None).expect("parses")
    }

    fn parse_err(text: &str) -> String {
        parse(text, "t.conf", None).expect_err("refused").to_string()
    }

    #[test]
    fn groups_expressions_and_restrictions() {
        let rules = parse_ok(
            "# comment\n\
             Mine = p+u+g+s+m+sha256\n\
             Less = Mine-m-s\n\
             /etc Mine # inline comment\n\
             !/etc/mtab$\n\
             =/boot/ d,f Less+i\n\
             /var/log >\n\
             /usr R-c\n",
        );
        assert_eq!(rules.rules.len(), 5);
        let mine =
            Attrs::PERM.with(Attrs::UID).with(Attrs::GID).with(Attrs::SIZE).with(Attrs::MTIME).with(Attrs::SHA256);
        assert_eq!(rules.rules[0].attrs, mine);
        assert_eq!(rules.rules[0].kind, RuleKind::Selective);
        assert_eq!(rules.rules[1].kind, RuleKind::Negative);
        assert_eq!(rules.rules[1].regex, "/etc/mtab$");
        assert_eq!(rules.rules[2].kind, RuleKind::Equals);
        assert_eq!(rules.rules[2].restriction, ftype::DIR | ftype::FILE);
        assert_eq!(
            rules.rules[2].attrs,
            Attrs::PERM.with(Attrs::UID).with(Attrs::GID).with(Attrs::SHA256).with(Attrs::INODE)
        );
        assert!(rules.rules[3].attrs.contains(Attrs::GROWING));
        assert!(!rules.rules[4].attrs.contains(Attrs::CTIME));
        assert_eq!(rules.rules[4].origin, "t.conf:8");
    }

    #[test]
    fn macros_and_conditionals() {
        let rules = parse_ok(
            "@@define BASE /srv/app\n\
             @@ifdef BASE\n\
             @@{BASE}/bin p+sha256\n\
             @@else\n\
             /never p\n\
             @@endif\n\
             @@if not defined NOPE\n\
             @@{BASE}/etc\\ dir p\n\
             @@endif\n\
             @@undef BASE\n\
             @@{BASE}/x p\n",
        );
        let regexes: Vec<&str> = rules.rules.iter().map(|r| r.regex.as_str()).collect();
        assert_eq!(regexes, ["/srv/app/bin", "/srv/app/etc dir", "/x"]);
    }

    #[test]
    fn unknown_syntax_names_the_line() {
        let e = parse_err("/etc p\n\n/usr p+bogus\n");
        assert!(e.contains("t.conf:3") && e.contains("bogus") && e.contains("/usr p+bogus"), "{e}");
        let e = parse_err("/etc p\nwhat is this\n");
        assert!(e.contains("t.conf:2") && e.contains("what is this"), "{e}");
        let e = parse_err("/etc\n");
        assert!(e.contains("t.conf:1") && e.contains("attribute expression"), "{e}");
        let e = parse_err("/etc q p\n");
        assert!(e.contains("file type"), "{e}");
        let e = parse_err("/etc( p\n");
        assert!(e.contains("t.conf:1") && e.contains("regex"), "{e}");
        let e = parse_err("@@frobnicate\n");
        assert!(e.contains("unknown directive"), "{e}");
        let e = parse_err("@@ifdef X\n/a p\n");
        assert!(e.contains("@@endif"), "{e}");
        let e = parse_err("bogus_option = 3\n");
        assert!(e.contains("unknown option"), "{e}");
    }

    #[test]
    fn aide_options_are_accepted() {
        let rules = parse_ok(
            "database_in=file:/var/lib/aide/aide.db\n\
             database_out=file:/var/lib/aide/aide.db.new\n\
             gzip_dbout=yes\n\
             report_url=stdout\n\
             report_ignore_changed_attrs = a+b\n\
             num_workers=4\n\
             /etc R+sha512+md5+acl+xattrs\n",
        );
        assert_eq!(rules.ignore_changed, Attrs::ATIME.with(Attrs::BCOUNT));
        assert_eq!(rules.num_workers, Some(4));
        assert!(rules.rules[0].attrs.contains(Attrs::SHA512.with(Attrs::SHA256)));
        assert_eq!(rules.notes.len(), 3, "{:?}", rules.notes);
    }

    #[test]
    fn a_debian_style_config_with_includes_parses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("aide.conf.d");
        std::fs::create_dir(&d).expect("mkdir");
        std::fs::write(d.join("10_aide_etc"), "/etc Full\n!/etc/mtab$\n").expect("write");
        std::fs::write(d.join("31_aide_apt"), "/var/lib/apt/lists VarDir\n").expect("write");
        std::fs::write(d.join("README.txt"), "not matched by the include regex\n").expect("write");
        let main = format!(
            "@@define DBDIR /var/lib/aide\n\
             @@define LOGDIR /var/log/aide\n\
             database_in=file:@@{{DBDIR}}/aide.db\n\
             database_out=file:@@{{DBDIR}}/aide.db.new\n\
             database_new=file:@@{{DBDIR}}/aide.db.new\n\
             gzip_dbout=yes\n\
             report_url=file:@@{{LOGDIR}}/aide.log\n\
             report_url=stdout\n\
             Checksums = H\n\
             OwnerMode = p+u+g+ftype\n\
             Size = s+b\n\
             InodeData = OwnerMode+n+i+Size+l+X\n\
             StaticFile = m+c+Checksums\n\
             Full = InodeData+StaticFile\n\
             VarDir = OwnerMode+n+i+X\n\
             @@x_include_setenv UPAC_settingsd /etc/aide/settings.d\n\
             @@x_include {} ^[a-zA-Z0-9_-]+$\n",
            d.display()
        );
        let rules = parse(&main, "aide.conf", Some(dir.path())).expect("parses");
        let regexes: Vec<&str> = rules.rules.iter().map(|r| r.regex.as_str()).collect();
        assert_eq!(regexes, ["/etc", "/etc/mtab$", "/var/lib/apt/lists"]);
        assert!(rules.rules[0].attrs.contains(Attrs::HASHES.with(Attrs::BCOUNT).with(Attrs::LNAME)));
        assert!(rules.rules[1].origin.ends_with("10_aide_etc:2"), "{}", rules.rules[1].origin);
        // An executable include would be run by AIDE: refused, by name.
        let script = d.join("50_script");
        std::fs::write(&script, "#!/bin/sh\necho /x p\n").expect("write");
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let e = parse(&main, "aide.conf", Some(dir.path())).expect_err("executable").to_string();
        assert!(e.contains("50_script") && e.contains("aide.conf:17"), "{e}");
    }

    #[test]
    fn escapes_follow_aide() {
        let rules = parse_ok("/a\\ b\\\\.c p\n/d\\.e p\n");
        assert_eq!(rules.rules[0].regex, "/a b\\.c");
        assert_eq!(rules.rules[1].regex, "/d\\.e");
    }
}

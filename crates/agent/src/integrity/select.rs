//! Which paths the rules select, and with which rule: AIDE 0.18's selection algorithm
//! (`src/seltree.c`), ported so that the same rules pick the same files.
//!
//! Each rule hangs on the tree node named by its regex's literal directory prefix
//! (`/etc/ssh/sshd_config$` on `/etc/ssh`). For a path, the nodes from its parent
//! directory up to `/` are consulted, deepest first; inside a node the first matching rule
//! wins. Equals rules count only on the node that is the path's own parent directory;
//! selective rules of a shallower node only if no deeper one matched. A positive match is
//! then vetoed by any negative rule of those nodes matching the path (or, unrestricted,
//! one of its parent directories). A regex is anchored at the start of the path only, so
//! `/etc` also selects `/etcetera` and `/etc/passwd`, as in AIDE. A directory is
//! descended into when it is selected (by any rule, as AIDE since 0.18.5 and Debian's
//! 0.18.3, which carries that fix), when the path could still
//! become a match of some rule (a partial match: PCRE2's `PARTIAL_SOFT`, computed here on
//! the lazy DFA), or when it is a node of the tree.

use super::rules::{Rule, RuleKind};
use regex_automata::hybrid::dfa::{Cache, DFA};
use regex_automata::hybrid::LazyStateID;
use regex_automata::util::start;
use regex_automata::{nfa::thompson, util::syntax, Anchored};
use std::collections::{HashMap, HashSet};

/// What the rules say about one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Selected by a selective rule (index into the rules): recorded, and descended into.
    Selective(usize),
    /// Selected by an equals rule: recorded, and descended into (the equals rule itself
    /// selects nothing deeper than its directory's own entries).
    Equal(usize),
    /// Not selected, but a rule could match below it: descended into.
    Partial,
    /// Not selected.
    None,
}

// The flags of AIDE's check_node_for_match.
const NEGATIVE: u32 = 1 << 0;
const SELECTIVE: u32 = 1 << 1;
const EQUAL: u32 = 1 << 2;
const RESTRICTED: u32 = 1 << 3;
const PARTIAL: u32 = 1 << 4;
const RULE_MATCH: u32 = EQUAL | SELECTIVE;
const DEEP_EQUAL: u32 = 1 << 5;
const DEEP_SELECTIVE: u32 = 1 << 6;
const RECURSED: u32 = 1 << 7;
const TOP_LEVEL: u32 = 1 << 8;

/// How far a path got through a regex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prefix {
    /// The regex matches a prefix of the path.
    Full,
    /// The path ended while the regex could still match a longer one.
    Partial,
    /// No match, however the path went on.
    None,
}

#[derive(Default)]
struct Node {
    equal: Vec<usize>,
    selective: Vec<usize>,
    negative: Vec<usize>,
}

impl Node {
    fn has_rules(&self) -> bool {
        !(self.equal.is_empty() && self.selective.is_empty() && self.negative.is_empty())
    }
}

/// The rules, compiled and hung on their tree nodes.
pub struct Selection {
    rules: Vec<Rule>,
    dfas: Vec<DFA>,
    caches: Vec<Cache>,
    /// Nodes carrying rules, by path.
    nodes: HashMap<Vec<u8>, Node>,
    /// Every node path: those with rules and all their ancestors.
    tree: HashSet<Vec<u8>>,
}

fn build(regex: &str) -> Result<DFA, String> {
    DFA::builder()
        .syntax(syntax::Config::new().utf8(false))
        .thompson(thompson::Config::new().utf8(false))
        .build(regex)
        .map_err(|e| format!("bad regex {regex:?}: {e}"))
}

/// Checks that `regex` compiles as a rule's path.
pub fn validate_regex(regex: &str) -> Result<(), String> {
    build(regex).map(drop)
}

/// The literal directory part of a rule's regex, as AIDE's `strrxtok`: up to the last `/`
/// before the first of `( ^ $ ? * [`, with backslash escapes undone; `/` at least.
fn literal_dir(regex: &str) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::with_capacity(regex.len());
    let mut last_slash = 1;
    let bytes = regex.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if i == 0 {
            out.push(b'/');
            i += 1;
            continue;
        }
        match b {
            b'/' => {
                last_slash = out.len();
                out.push(b);
            }
            b'(' | b'^' | b'$' | b'?' | b'*' | b'[' => break,
            b'\\' => {
                // The escaped byte is taken literally and not looked at.
                if let Some(&next) = bytes.get(i + 1) {
                    out.push(next);
                }
                i += 1;
            }
            b => out.push(b),
        }
        i += 1;
    }
    out.truncate(last_slash.max(1));
    out
}

/// A path's parent directory, as AIDE computes it (`/` for `/x` and for `/`).
fn dirname(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(0) | None => b"/",
        Some(i) => &path[..i],
    }
}

impl Selection {
    /// Compiles `rules` into the tree.
    pub fn new(rules: &[Rule]) -> Result<Selection, String> {
        let mut dfas = Vec::with_capacity(rules.len());
        let mut nodes: HashMap<Vec<u8>, Node> = HashMap::new();
        let mut tree: HashSet<Vec<u8>> = HashSet::new();
        tree.insert(b"/".to_vec());
        for (index, rule) in rules.iter().enumerate() {
            dfas.push(build(&rule.regex).map_err(|e| format!("{}: {e}", rule.origin))?);
            let dir = literal_dir(&rule.regex);
            let mut ancestor: &[u8] = &dir;
            loop {
                tree.insert(ancestor.to_vec());
                if ancestor == b"/" {
                    break;
                }
                ancestor = dirname(ancestor);
            }
            let node = nodes.entry(dir).or_default();
            match rule.kind {
                RuleKind::Equals => node.equal.push(index),
                RuleKind::Selective => node.selective.push(index),
                RuleKind::Negative => node.negative.push(index),
            }
        }
        let caches = dfas.iter().map(DFA::create_cache).collect();
        Ok(Selection { rules: rules.to_vec(), dfas, caches, nodes, tree })
    }

    /// The rules, as given.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether `path` is a node of the tree (a rule's directory or one of its ancestors):
    /// such a directory is walked even when nothing selects it.
    pub fn is_node(&self, path: &[u8]) -> bool {
        self.tree.contains(path)
    }

    /// What the rules say about `path`, a file of type `ftype` (a bit of
    /// [`super::rules::ftype`]).
    pub fn classify(&mut self, path: &[u8], ftype: u8) -> Decision {
        let mut flags = TOP_LEVEL;
        let mut parent = dirname(path);
        while !self.tree.contains(parent) {
            flags |= RECURSED;
            parent = dirname(parent);
        }
        let mut rule = None;
        let parent = parent.to_vec();
        let flags = self.check_node(&parent, path, ftype, flags, &mut rule);
        match rule {
            Some(r) if flags & SELECTIVE != 0 => Decision::Selective(r),
            Some(r) if flags & EQUAL != 0 => Decision::Equal(r),
            _ if flags & PARTIAL != 0 => Decision::Partial,
            _ => Decision::None,
        }
    }

    fn check_node(&mut self, node: &[u8], text: &[u8], ftype: u8, mut flags: u32, rule: &mut Option<usize>) -> u32 {
        let parent = if node == b"/" { None } else { Some(dirname(node).to_vec()) };
        let (equal, selective, negative) = match self.nodes.get(node).filter(|n| n.has_rules()) {
            Some(n) => (n.equal.clone(), n.selective.clone(), n.negative.clone()),
            None => {
                if let Some(parent) = parent {
                    flags = self.check_node(&parent, text, ftype, (flags | RECURSED) & !TOP_LEVEL, rule);
                }
                return finish(flags);
            }
        };
        if flags & RECURSED == 0 {
            flags |= RECURSED;
            match self.check_list(&equal, text, ftype, false, rule) {
                RESTRICTED | RULE_MATCH => flags |= EQUAL | DEEP_EQUAL,
                PARTIAL => flags |= PARTIAL,
                _ => {}
            }
        }
        if flags & (DEEP_EQUAL | DEEP_SELECTIVE) == 0 {
            match self.check_list(&selective, text, ftype, false, rule) {
                RESTRICTED | RULE_MATCH => flags |= SELECTIVE | DEEP_SELECTIVE,
                PARTIAL => flags |= PARTIAL,
                _ => {}
            }
        }
        if let Some(parent) = parent {
            flags = self.check_node(&parent, text, ftype, flags & !TOP_LEVEL, rule);
        } else {
            flags = finish(flags & !TOP_LEVEL);
        }
        // Negative rules are the strongest, so they are checked last.
        if flags & (SELECTIVE | EQUAL) != 0 && !negative.is_empty() {
            let mut vetoed = false;
            let mut ancestor: &[u8] = text;
            loop {
                ancestor = dirname(ancestor);
                if ancestor <= node {
                    break;
                }
                if self.check_list(&negative, ancestor, super::rules::ftype::DIR, true, rule) == RULE_MATCH {
                    flags = NEGATIVE;
                    vetoed = true;
                    break;
                }
            }
            if !vetoed {
                match self.check_list(&negative, text, ftype, false, rule) {
                    RESTRICTED => flags = PARTIAL,
                    RULE_MATCH => flags = NEGATIVE,
                    _ => {}
                }
            }
        }
        finish(flags)
    }

    fn check_list(
        &mut self,
        list: &[usize],
        text: &[u8],
        ftype: u8,
        unrestricted_only: bool,
        rule: &mut Option<usize>,
    ) -> u32 {
        let mut result = 0;
        for &index in list {
            let restriction = self.rules[index].restriction;
            if unrestricted_only && restriction != 0 {
                continue;
            }
            match self.prefix_match(index, text) {
                Prefix::Full if restriction == 0 || ftype & restriction != 0 => {
                    *rule = Some(index);
                    return if restriction != 0 { RESTRICTED } else { RULE_MATCH };
                }
                Prefix::Full | Prefix::Partial => result = PARTIAL,
                Prefix::None => {}
            }
        }
        result
    }

    /// Runs rule `index`'s regex, anchored, over `text` byte by byte.
    fn prefix_match(&mut self, index: usize, text: &[u8]) -> Prefix {
        let dfa = &self.dfas[index];
        let cache = &mut self.caches[index];
        let step = |cache: &mut Cache| -> Result<Prefix, String> {
            let mut state: LazyStateID =
                dfa.start_state(cache, &start::Config::new().anchored(Anchored::Yes)).map_err(|e| e.to_string())?;
            for &byte in text {
                state = dfa.next_state(cache, state, byte).map_err(|e| e.to_string())?;
                // Match states are delayed by one byte: this one says a match ended
                // before `byte`, which is a match of a prefix.
                if state.is_match() {
                    return Ok(Prefix::Full);
                }
                if state.is_dead() {
                    return Ok(Prefix::None);
                }
                if state.is_quit() {
                    return Err("the regex engine gave up on this path".into());
                }
            }
            let end = dfa.next_eoi_state(cache, state).map_err(|e| e.to_string())?;
            Ok(if end.is_match() { Prefix::Full } else { Prefix::Partial })
        };
        match step(cache) {
            Ok(p) => p,
            Err(e) => {
                log::warn!("rule {}: {e}; taken as no match", self.rules[index].origin);
                Prefix::None
            }
        }
    }
}

/// What a nested call hands back: whether a positive rule matched, else whether a
/// partial match was seen.
fn finish(flags: u32) -> u32 {
    if flags & TOP_LEVEL != 0 {
        flags
    } else if flags & (EQUAL | SELECTIVE) != 0 {
        flags & (EQUAL | SELECTIVE)
    } else {
        flags & PARTIAL
    }
}

#[cfg(test)]
mod tests {
    use super::super::rules::{ftype, parse};
    use super::*;

    fn selection(text: &str) -> Selection {
        Selection::new(&parse(text, "t.conf", None).expect("parses").rules).expect("compiles")
    }

    #[test]
    fn literal_dirs_follow_strrxtok() {
        assert_eq!(literal_dir("/etc"), b"/");
        assert_eq!(literal_dir("/etc/"), b"/etc");
        assert_eq!(literal_dir("/etc/ssh/sshd_config$"), b"/etc/ssh");
        assert_eq!(literal_dir("/var/log/.*\\.log$"), b"/var/log");
        assert_eq!(literal_dir("/a\\.b/c"), b"/a.b");
        assert_eq!(literal_dir("/x/(a|b)/c"), b"/x");
    }

    #[test]
    fn selective_rules_take_the_subtree_and_regexes_are_prefixes() {
        let mut s = selection("/srv/app p\n");
        // No rule hangs on `/`, so nothing is said about /srv; it is walked as a tree node.
        assert_eq!(s.classify(b"/srv", ftype::DIR), Decision::None);
        assert!(s.is_node(b"/srv") && !s.is_node(b"/usr"));
        assert_eq!(s.classify(b"/srv/app", ftype::DIR), Decision::Selective(0));
        assert_eq!(s.classify(b"/srv/app/x/y", ftype::FILE), Decision::Selective(0));
        // Anchored at the start only, as AIDE.
        assert_eq!(s.classify(b"/srv/apple", ftype::FILE), Decision::Selective(0));
        assert_eq!(s.classify(b"/srv/other", ftype::FILE), Decision::None);
        assert_eq!(s.classify(b"/usr", ftype::DIR), Decision::None);
    }

    #[test]
    fn negative_rules_win_and_cover_children() {
        let mut s = selection("/srv p\n!/srv/cache$\n!/srv/tmp\n/srv/tmp/keep p+u\n");
        assert_eq!(s.classify(b"/srv/cache", ftype::DIR), Decision::None);
        assert_eq!(s.classify(b"/srv/cachet", ftype::FILE), Decision::Selective(0));
        assert_eq!(s.classify(b"/srv/tmp/x", ftype::FILE), Decision::None);
        // A negative rule of a shallower node vetoes a deeper positive match too.
        assert_eq!(s.classify(b"/srv/tmp/keep", ftype::FILE), Decision::None);
        // Children of a `$`-anchored negative directory are vetoed through their parent.
        assert_eq!(s.classify(b"/srv/cache/a", ftype::FILE), Decision::None);
    }

    #[test]
    fn deeper_nodes_take_precedence_first_match_inside_a_node() {
        let mut s = selection("/srv p\n/srv/app/bin p+u\n/srv/app/bin/special p+u+g\n/srv/app/.* p+g\n");
        assert_eq!(s.classify(b"/srv/app/bin/ls", ftype::FILE), Decision::Selective(1));
        assert_eq!(s.classify(b"/srv/app/lib", ftype::FILE), Decision::Selective(3));
        assert_eq!(s.classify(b"/srv/x", ftype::FILE), Decision::Selective(0));
    }

    #[test]
    fn equals_rules_do_not_take_children() {
        let mut s = selection("=/srv/app p\n=/srv/data/ p+u\n");
        assert_eq!(s.classify(b"/srv/app", ftype::DIR), Decision::Equal(0));
        assert_eq!(s.classify(b"/srv/appendix", ftype::FILE), Decision::Equal(0));
        assert_eq!(s.classify(b"/srv/app/x", ftype::FILE), Decision::None);
        assert_eq!(s.classify(b"/srv/data/f", ftype::FILE), Decision::Equal(1));
        assert_eq!(s.classify(b"/srv/data/sub/f", ftype::FILE), Decision::None);
    }

    #[test]
    fn restrictions_select_by_type() {
        let mut s = selection("/srv f p\n!/srv/d d\n");
        assert_eq!(s.classify(b"/srv/file", ftype::FILE), Decision::Selective(0));
        assert_eq!(s.classify(b"/srv/dir", ftype::DIR), Decision::Partial);
        let mut s = selection("/srv p\n!/srv/d d\n");
        // A restricted negative match leaves a partial match (AIDE's RESTRICTED_RULE_MATCH).
        assert_eq!(s.classify(b"/srv/d", ftype::DIR), Decision::Partial);
        assert_eq!(s.classify(b"/srv/d", ftype::FILE), Decision::Selective(0));
    }
}

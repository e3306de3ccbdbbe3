//! Optional bearer-token authentication with a per-token command allow-list.
//!
//! Off unless `--tokens FILE` is given. The file is JSON:
//!
//! ```json
//! {"tokens": [
//!   {"name": "ops", "token": "…", "methods": ["sync.bash", "sync.query"], "commands": ["uptime", "ls *"]},
//!   {"name": "agents", "token": "…", "manage_hosts": true},
//!   {"name": "inventory", "token": "…", "methods": [], "manage_fleet": true}
//! ]}
//! ```
//!
//! Tokens are kept only as SHA-256 digests, and looked up by digest, so comparing them
//! leaks nothing useful through timing.

use crate::error::ApiError;
use axum::http::HeaderMap;
use polaris_ops_wire::codes::Code;
use polaris_ops_wire::wire::Method;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;

/// Characters that let a shell command do more than one thing. A `*` in an allow-list
/// pattern never matches them, so `ls *` allows `ls -la /tmp` but not `ls; rm -rf /`.
pub const SHELL_METACHARACTERS: &str = ";&|$`<>(){}\\'\"!\n\r#*?[]~";

/// What one token may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPolicy {
    /// The token's name, stored with the jobs it creates.
    pub name: String,
    /// Methods it may use.
    pub methods: Vec<Method>,
    /// Command patterns it may run (`*` matches a run of non-metacharacters).
    pub commands: Vec<String>,
    /// Whether it may register and delete hosts (what agents need).
    pub manage_hosts: bool,
    /// Whether it may change the fleet: nodes, where hosts sit, labels, imports.
    pub manage_fleet: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    tokens: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    token: String,
    #[serde(default)]
    methods: Option<Vec<Method>>,
    #[serde(default)]
    commands: Vec<String>,
    #[serde(default)]
    manage_hosts: bool,
    #[serde(default)]
    manage_fleet: bool,
}

/// The loaded token table.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    by_digest: HashMap<[u8; 32], TokenPolicy>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Tokens {
    /// Loads a tokens file.
    pub fn load(path: &Path) -> anyhow::Result<Tokens> {
        let text =
            std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read tokens file {}: {e}", path.display()))?;
        Tokens::parse(&text).map_err(|e| anyhow::anyhow!("tokens file {}: {e}", path.display()))
    }

    /// Parses the JSON text of a tokens file.
    pub fn parse(text: &[u8]) -> anyhow::Result<Tokens> {
        let file: TokensFile = serde_json::from_slice(text)?;
        let mut by_digest = HashMap::new();
        for entry in file.tokens {
            if entry.token.len() < 16 {
                anyhow::bail!("token {:?} is shorter than 16 characters", entry.name);
            }
            let policy = TokenPolicy {
                name: entry.name,
                methods: entry.methods.unwrap_or_else(|| vec![Method::SyncBash, Method::AsyncBash, Method::SyncQuery]),
                commands: entry.commands,
                manage_hosts: entry.manage_hosts,
                manage_fleet: entry.manage_fleet,
            };
            if by_digest.insert(digest(&entry.token), policy).is_some() {
                anyhow::bail!("a token is listed twice");
            }
        }
        Ok(Tokens { by_digest })
    }

    /// The policy of the request's `Authorization: Bearer` token.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<&TokenPolicy, ApiError> {
        let header = headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::general(Code::MissingToken, "an Authorization: Bearer token is required"))?;
        let token = header.to_str().ok().and_then(|h| h.strip_prefix("Bearer ")).map(str::trim).ok_or_else(|| {
            ApiError::general(Code::MissingToken, "the Authorization header must be `Bearer <token>`")
        })?;
        self.by_digest.get(&digest(token)).ok_or_else(|| ApiError::general(Code::InvalidToken, "unknown bearer token"))
    }
}

impl TokenPolicy {
    /// Whether this token may run `method` with `cmd`.
    pub fn check_job(&self, method: Method, cmd: &str) -> Result<(), ApiError> {
        if !self.methods.contains(&method) {
            return Err(ApiError::field(
                Code::OperationNotAllowed,
                "method",
                format!("token {:?} may not use {}", self.name, method.as_str()),
            ));
        }
        if method.runs_command() && !self.commands.iter().any(|p| command_matches(p, cmd)) {
            return Err(ApiError::field(
                Code::CommandNotAllowed,
                "cmd",
                format!("token {:?} may not run this command", self.name),
            ));
        }
        Ok(())
    }

    /// Whether this token may register or delete hosts.
    pub fn check_manage_hosts(&self) -> Result<(), ApiError> {
        if self.manage_hosts {
            Ok(())
        } else {
            Err(ApiError::general(Code::OperationNotAllowed, format!("token {:?} may not manage hosts", self.name)))
        }
    }

    /// Whether this token may change the fleet (nodes, placements, labels, imports).
    pub fn check_manage_fleet(&self) -> Result<(), ApiError> {
        if self.manage_fleet {
            Ok(())
        } else {
            Err(ApiError::general(
                Code::OperationNotAllowed,
                format!("token {:?} may not change the fleet (it needs manage_fleet)", self.name),
            ))
        }
    }
}

/// Whether `cmd` matches allow-list `pattern`: literal characters match themselves, `*`
/// matches any run (possibly empty) of characters that are not shell metacharacters.
pub fn command_matches(pattern: &str, cmd: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let cmd: Vec<char> = cmd.chars().collect();
    // matches[j]: pattern[..i] matches cmd[..j], for the current i (classic glob DP).
    let mut matches = vec![false; cmd.len() + 1];
    matches[0] = true;
    for &p in &pattern {
        let mut next = vec![false; cmd.len() + 1];
        if p == '*' {
            next[0] = matches[0];
            for j in 1..=cmd.len() {
                next[j] = matches[j] || (next[j - 1] && !SHELL_METACHARACTERS.contains(cmd[j - 1]));
            }
        } else {
            for j in 1..=cmd.len() {
                next[j] = matches[j - 1] && cmd[j - 1] == p;
            }
        }
        matches = next;
    }
    matches[cmd.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_never_matches_shell_metacharacters() {
        assert!(command_matches("uptime", "uptime"));
        assert!(!command_matches("uptime", "uptime; id"));
        assert!(command_matches("ls *", "ls -la /tmp"));
        assert!(command_matches("ls *", "ls "));
        assert!(!command_matches("ls *", "ls; rm -rf /"));
        assert!(!command_matches("ls *", "ls $(id)"));
        assert!(!command_matches("ls *", "ls `id`"));
        assert!(!command_matches("ls *", "ls /tmp\nid"));
        assert!(command_matches("systemctl status *.service", "systemctl status nginx.service"));
        assert!(command_matches("*", "echo hi"));
        assert!(!command_matches("*", "echo hi | sh"));
    }

    #[test]
    fn tokens_are_looked_up_by_digest() {
        let tokens =
            Tokens::parse(br#"{"tokens": [{"name": "ops", "token": "0123456789abcdef", "commands": ["uptime"]}]}"#)
                .expect("valid");
        let mut headers = HeaderMap::new();
        assert_eq!(tokens.authenticate(&headers).map(|_| ()).map_err(|e| e.code), Err(Code::MissingToken));
        headers.insert("authorization", "Bearer nope-nope-nope-nope".parse().expect("header"));
        assert_eq!(tokens.authenticate(&headers).map(|_| ()).map_err(|e| e.code), Err(Code::InvalidToken));
        headers.insert("authorization", "Bearer 0123456789abcdef".parse().expect("header"));
        let policy = tokens.authenticate(&headers).expect("known");
        assert!(policy.check_job(Method::SyncBash, "uptime").is_ok());
        assert_eq!(policy.check_job(Method::SyncBash, "id").map_err(|e| e.code), Err(Code::CommandNotAllowed));
        assert!(policy.check_job(Method::SyncQuery, "").is_ok());
        assert_eq!(policy.check_manage_hosts().map_err(|e| e.code), Err(Code::OperationNotAllowed));
        assert_eq!(policy.check_manage_fleet().map_err(|e| e.code), Err(Code::OperationNotAllowed));
        let fleet =
            Tokens::parse(br#"{"tokens": [{"name": "inv", "token": "0123456789abcdef", "manage_fleet": true}]}"#)
                .expect("valid");
        headers.insert("authorization", "Bearer 0123456789abcdef".parse().expect("header"));
        assert!(fleet.authenticate(&headers).expect("known").check_manage_fleet().is_ok());
        assert!(Tokens::parse(br#"{"tokens": [{"name": "x", "token": "short"}]}"#).is_err());
    }
}

//! Where the dispatcher is and how to authenticate: each setting from its flag, else its
//! environment variable (clap reads both), else the config file, else the default.
//!
//! The config file is TOML, `--config FILE`, else `$XDG_CONFIG_HOME/polaris/config.toml`,
//! else `~/.config/polaris/config.toml` (a missing default file is fine, a missing
//! `--config` is an error):
//!
//! ```toml
//! url = "http://dispatch.example:8080"
//! token = "…"
//! ```

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The dispatcher URL when nothing names one.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";

/// The config file's settings.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Dispatcher base URL.
    pub url: Option<String>,
    /// Bearer token.
    pub token: Option<String>,
}

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// It cannot be read.
    #[error("cannot read the config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not valid TOML of the expected shape.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the TOML parser said.
        message: String,
    },
    /// The URL is not an http(s) URL.
    #[error("the dispatcher URL {0:?} must start with http:// or https://")]
    BadUrl(String),
}

/// The settings a command runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Dispatcher base URL, without a trailing `/`.
    pub url: String,
    /// Bearer token, if any.
    pub token: Option<String>,
}

/// The default config file's path, if a home or config directory is known.
pub fn default_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("polaris/config.toml"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|home| PathBuf::from(home).join(".config/polaris/config.toml"))
}

/// Reads a config file.
pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })
}

/// Settles the settings: `url` and `token` are what the flags or the environment gave.
pub fn resolve(url: Option<String>, token: Option<String>, config: Option<&Path>) -> Result<Settings, ConfigError> {
    let file = match config {
        Some(path) => read_file(path)?,
        None => match default_path() {
            Some(path) if path.is_file() => read_file(&path)?,
            _ => FileConfig::default(),
        },
    };
    // An empty variable (`POLARIS_URL=`) counts as unset, as shells make it easy to leave one.
    let url = url.filter(|u| !u.is_empty()).or(file.url).unwrap_or_else(|| DEFAULT_URL.to_string());
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(ConfigError::BadUrl(url));
    }
    let token = token.filter(|t| !t.is_empty()).or(file.token).filter(|t| !t.is_empty());
    Ok(Settings { url: url.trim_end_matches('/').to_string(), token })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_the_file_over_the_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "url = \"http://file:1/\"\ntoken = \"from-file\"\n").expect("write");
        let s = resolve(None, None, Some(&path)).expect("resolve");
        assert_eq!(s, Settings { url: "http://file:1".into(), token: Some("from-file".into()) });
        let s = resolve(Some("http://flag:2".into()), Some("t".into()), Some(&path)).expect("resolve");
        assert_eq!(s, Settings { url: "http://flag:2".into(), token: Some("t".into()) });
        assert_eq!(resolve(Some(String::new()), None, Some(&path)).expect("resolve").url, "http://file:1");
        std::fs::write(&path, "").expect("write");
        assert_eq!(resolve(None, None, Some(&path)).expect("resolve").url, DEFAULT_URL);
        std::fs::write(&path, "uri = 1").expect("write");
        assert!(matches!(resolve(None, None, Some(&path)), Err(ConfigError::Parse { .. })));
        assert!(matches!(
            resolve(Some("ftp://x".into()), None, Some(&path)),
            Err(ConfigError::Parse { .. } | ConfigError::BadUrl(_))
        ));
        assert!(matches!(resolve(None, None, Some(&dir.path().join("missing"))), Err(ConfigError::Read { .. })));
    }
}

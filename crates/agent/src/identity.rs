//! The agent's host id: given by `--host-id`, or generated on first run and kept in the
//! state file so the host keeps its tube across restarts.

use anyhow::Context as _;
use polaris_ops_wire::host_id::{is_valid_host_id, MAX_HOST_ID_LEN};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Serialize, Deserialize)]
struct StateFile {
    host_id: String,
}

/// The host id to use: `flag` if given, else the one in `state_file`, else a new one
/// (hostname plus a random suffix) written to `state_file`. A flag given while no state
/// file exists is written too, so later runs without the flag keep the same id.
pub fn resolve_host_id(flag: Option<&str>, state_file: &Path) -> anyhow::Result<String> {
    if let Some(id) = flag {
        anyhow::ensure!(
            is_valid_host_id(id),
            "--host-id {id:?}: use 1 to {MAX_HOST_ID_LEN} bytes of A-Z a-z 0-9 . _ -, not starting with - or ."
        );
        if !state_file.exists() {
            save(state_file, id)?;
        }
        return Ok(id.to_string());
    }
    match std::fs::read(state_file) {
        Ok(bytes) => {
            let state: StateFile = serde_json::from_slice(&bytes)
                .with_context(|| format!("state file {} is not valid", state_file.display()))?;
            anyhow::ensure!(
                is_valid_host_id(&state.host_id),
                "state file {} holds an invalid host id {:?}",
                state_file.display(),
                state.host_id
            );
            Ok(state.host_id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = generate_host_id(&std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default());
            save(state_file, &id)?;
            log::info!("generated host id {id}, kept in {}", state_file.display());
            Ok(id)
        }
        Err(e) => Err(e).with_context(|| format!("reading state file {}", state_file.display())),
    }
}

/// `<hostname>-<8 hex>`, with the hostname reduced to host-id characters.
pub fn generate_host_id(hostname: &str) -> String {
    let mut base: String = hostname
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' { c } else { '-' })
        .collect();
    base = base.trim_start_matches(['-', '.']).to_string();
    base.truncate(MAX_HOST_ID_LEN - 9);
    if base.is_empty() {
        base = "host".into();
    }
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{base}-{}", &suffix[..8])
}

fn save(state_file: &Path, host_id: &str) -> anyhow::Result<()> {
    if let Some(dir) = state_file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_json::to_vec_pretty(&StateFile { host_id: host_id.to_string() })?;
    // Write then rename, so a crash never leaves a half-written state file.
    let tmp = state_file.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, state_file).with_context(|| format!("renaming to {}", state_file.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_id_is_kept_across_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("sub/state.json");
        let first = resolve_host_id(None, &file).expect("generate");
        assert!(is_valid_host_id(&first), "{first}");
        assert_eq!(resolve_host_id(None, &file).expect("reload"), first);
        assert_eq!(resolve_host_id(Some("web-1"), &file).expect("flag wins"), "web-1");
        assert!(resolve_host_id(Some("bad id"), &file).is_err());
    }

    #[test]
    fn hostnames_become_valid_ids() {
        assert!(generate_host_id("My Host!\n").starts_with("My-Host--"));
        assert!(is_valid_host_id(&generate_host_id("-.weird")));
        assert!(is_valid_host_id(&generate_host_id("")));
        assert!(is_valid_host_id(&generate_host_id(&"x".repeat(300))));
    }
}

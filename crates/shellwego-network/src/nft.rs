//! Driving the `nft` command: one script applied as one atomic transaction (`nft -f -`),
//! and a table listed as JSON. Everything the project owns in nftables goes through here.

use std::io::Write;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nft failed: {0}")]
    Failed(String),
    #[error("cannot run nft (apt-get install nftables): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("nft printed JSON this code does not understand: {0}")]
    Json(String),
}

fn run(args: &[&str], stdin: Option<&str>) -> Result<std::process::Output, NftError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(NftError::Spawn)?;
    }
    child.wait_with_output().map_err(NftError::Spawn)
}

/// Applies `script` in one transaction: all of it, or (on any error) none of it.
pub fn apply(script: &str) -> Result<(), NftError> {
    let out = run(&["-f", "-"], Some(script))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftError::Failed(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// The table `family name` as nft's JSON, or `None` when there is no such table.
pub fn list_table(family: &str, name: &str) -> Result<Option<serde_json::Value>, NftError> {
    let out = run(&["-j", "list", "table", family, name], None)?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if err.contains("No such file or directory") {
            return Ok(None);
        }
        return Err(NftError::Failed(err));
    }
    serde_json::from_slice(&out.stdout)
        .map(Some)
        .map_err(|e| NftError::Json(e.to_string()))
}

/// True if the table exists.
pub fn has_table(family: &str, name: &str) -> bool {
    Command::new("nft")
        .args(["list", "table", family, name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

//! Driving the `nft` command: one script applied as one atomic transaction (`nft -f -`),
//! and a table listed as JSON. Everything the project owns in nftables goes through here.

use std::process::Command;
use std::time::Duration;

use shellwego_sys::command::{output_within, CommandError};

/// How long one `nft` run may take. A transaction of every VM's fence applies in well
/// under a second; a kernel that does not answer within this is not going to.
pub const NFT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nft failed: {0}")]
    Failed(String),
    #[error("cannot run nft (apt-get install nftables): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("nft printed JSON this code does not understand: {0}")]
    Json(String),
    #[error("`{cmd}` did not finish within {limit:?} and was killed")]
    TimedOut { cmd: String, limit: Duration },
}

fn run(args: &[&str], stdin: Option<&str>) -> Result<std::process::Output, NftError> {
    output_within(
        Command::new("nft").args(args),
        stdin.map(str::as_bytes),
        NFT_TIMEOUT,
    )
    .map_err(|e| match e {
        CommandError::TimedOut { cmd, limit } => NftError::TimedOut { cmd, limit },
        CommandError::Spawn { source, .. } | CommandError::Io { source, .. } => {
            NftError::Spawn(source)
        }
    })
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
    run(&["list", "table", family, name], None).is_ok_and(|out| out.status.success())
}

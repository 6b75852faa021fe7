//! Runs a command (a whole test run) with one zfs-fuse daemon kept up for all of it.
//!
//! Every test process that makes a pool needs the daemon; alone, each starts one and the
//! last user stops it at exit, which costs seconds per test binary (zfs-fuse takes about
//! 2.5 s to exit after SIGTERM). This process registers as a user for the whole run, so
//! the daemon is started once and stopped once, when the command has finished.
//!
//! Usage: `swg-zfs-session COMMAND [ARGS...]`; exits with the command's status.

use std::process::{exit, Command};

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let Some((program, rest)) = args.split_first() else {
        eprintln!("usage: swg-zfs-session COMMAND [ARGS...]");
        exit(2);
    };
    shellwego_testkit::zfs::ensure_daemon();
    let status = match Command::new(program).args(rest).status() {
        Ok(status) => status,
        Err(e) => {
            eprintln!(
                "swg-zfs-session: cannot run {}: {e}",
                program.to_string_lossy()
            );
            exit(127);
        }
    };
    // `exit` runs the atexit hook that stops the daemon when no other user is left.
    exit(status.code().unwrap_or(1));
}

//! One copy of each host helper the ShellWeGo crates share: the file lock ([`lock`]), the
//! atomic file write with fsync ([`atomic`]), process facts from `/proc` and signals
//! ([`process`], [`meminfo`]), external commands bounded by a deadline ([`command`]) and
//! the Unix socket connect that follows no symlink and cannot wait forever ([`socket`]),
//! bind mounts ([`mount`]) and entering a network namespace ([`netns`]).
//!
//! Why a crate of its own: storage, network and the agent each needed these and each had
//! its own hand-written copy (two `flock` wrappers, four atomic writes, three `/proc`
//! parsers). The lowest existing crates (storage, network) do not depend on each other,
//! so neither could hold them for both; this crate sits below all of them, depends on
//! nothing of the project, and keeps the `unsafe`-free system calls of `rustix` and the
//! `/proc` parsing of `procfs` behind a few small functions.

pub mod atomic;
pub mod command;
pub mod lock;
pub mod meminfo;
pub mod mount;
pub mod netns;
pub mod process;
pub mod socket;

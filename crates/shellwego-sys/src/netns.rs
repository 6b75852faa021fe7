//! Network namespaces.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;

use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};

/// Moves the calling thread into the network namespace `ns` (an open `/run/netns/NAME` or
/// `/proc/PID/ns/net`). Only the thread moves: callers use a thread of their own, or a
/// child between fork and exec (this is one system call, safe there).
pub fn enter(ns: &File) -> io::Result<()> {
    move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network)).map_err(io::Error::from)
}

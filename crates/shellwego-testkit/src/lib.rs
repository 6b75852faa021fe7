//! Fixtures for tests that use real services. Each fixture starts what it needs, owns it,
//! and tears it down on drop (also when the test panics). A missing prerequisite fails
//! the test with a message saying what is missing and how to get it: nothing skips.

pub mod guest;
pub mod listen;
pub mod netns;
pub mod oci;
pub mod prereq;
pub mod process;
pub mod proxy;
pub mod registry;
pub mod zfs;

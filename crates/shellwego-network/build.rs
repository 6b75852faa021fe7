//! Compiles the eBPF QoS program with clang at build time.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "bpf/qos.bpf.c";
    println!("cargo:rerun-if-changed={src}");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("qos.bpf.o");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let status = Command::new(&clang)
        .args([
            "-O2",
            "-g",
            "-target",
            "bpf",
            "-Wall",
            "-I/usr/include/x86_64-linux-gnu",
            "-c",
            src,
            "-o",
        ])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} could not compile {src} ({s}); it needs libbpf-dev for bpf/bpf_helpers.h (`make setup`)"),
        Err(e) => panic!("cannot run {clang} to compile {src}: {e}; install clang (`make setup`) or set CLANG"),
    }
}

//! Builds the demo app's OCI image (Alpine 3.23 + a static busybox httpd serving a page)
//! and prints the OCI layout's path (tag "1"). Used by `scripts/demo.sh`.

use std::path::PathBuf;

use shellwego_testkit::oci::alpine_web_image;

fn main() {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "/var/cache/shellwego/demo-image".into()),
    );
    let _ = std::fs::remove_dir_all(&out);
    alpine_web_image(
        &out,
        b"<html><body><h1>Hello from a ShellWeGo microVM</h1></body></html>\n",
    );
    println!("{}", out.display());
}

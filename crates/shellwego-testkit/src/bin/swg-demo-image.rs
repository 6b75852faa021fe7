//! Builds the demo app's OCI image: the real Alpine 3.23 root plus a layer with a static
//! busybox (Debian's busybox-static, which has `httpd`) and a page to serve. Prints the
//! OCI layout's path (tag "1"). Used by `scripts/demo.sh`.

use std::path::PathBuf;

use shellwego_testkit::oci::{alpine_layer_tar, ImageBuilder, LayerCompression, TarBuilder};

fn main() {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "/var/cache/shellwego/demo-image".into()),
    );
    let busybox = std::fs::read("/bin/busybox").unwrap_or_else(|e| {
        eprintln!("cannot read /bin/busybox ({e}): apt-get install busybox-static (`make setup`)");
        std::process::exit(1);
    });
    let page = b"<html><body><h1>Hello from a ShellWeGo microVM</h1></body></html>\n";
    let web = TarBuilder::new()
        .dir("usr/local/bin/", 0o755)
        .file("usr/local/bin/busybox-httpd", 0o755, &busybox)
        .dir("srv/", 0o755)
        .file("srv/index.html", 0o644, page)
        .finish();
    let _ = std::fs::remove_dir_all(&out);
    ImageBuilder::new()
        .layer(&alpine_layer_tar(), LayerCompression::Gzip)
        .layer(&web, LayerCompression::Gzip)
        .cmd(&[
            "/usr/local/bin/busybox-httpd",
            "httpd",
            "-f",
            "-v",
            "-p",
            "8080",
            "-h",
            "/srv",
        ])
        .write_layout(&out, "1");
    println!("{}", out.display());
}

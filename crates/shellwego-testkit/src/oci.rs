//! Builds OCI image layouts on disk (layers from tar bytes, a config, a manifest and an
//! index), so tests can push real images, hostile ones included, to a real registry.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::process::repo_script_path;

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// How a layer is stored in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    Gzip,
    Zstd,
}

/// An image under construction.
pub struct ImageBuilder {
    layers: Vec<(Vec<u8>, String, &'static str)>,
    cmd: Vec<String>,
    entrypoint: Vec<String>,
    env: Vec<String>,
    working_dir: String,
}

fn compress(tar: &[u8], how: LayerCompression) -> Vec<u8> {
    let program = match how {
        LayerCompression::Gzip => "gzip",
        LayerCompression::Zstd => "zstd",
    };
    let mut child = Command::new(program)
        .args(["-c", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (apt-get install {program})"));
    let mut stdin = child.stdin.take().expect("piped stdin");
    let data = tar.to_vec();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        stdin.write_all(&data).expect("write to compressor");
    });
    let out = child.wait_with_output().expect("compressor output");
    writer.join().expect("writer thread");
    assert!(out.status.success(), "{program} failed");
    out.stdout
}

impl Default for ImageBuilder {
    fn default() -> Self {
        ImageBuilder::new()
    }
}

impl ImageBuilder {
    pub fn new() -> ImageBuilder {
        ImageBuilder {
            layers: Vec::new(),
            cmd: vec!["/bin/sh".into()],
            entrypoint: Vec::new(),
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            working_dir: "/".into(),
        }
    }

    /// Adds a layer from uncompressed tar bytes.
    pub fn layer(mut self, tar: &[u8], how: LayerCompression) -> Self {
        let media = match how {
            LayerCompression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            LayerCompression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        };
        self.layers.push((compress(tar, how), sha256(tar), media));
        self
    }

    /// Adds a gzip layer holding one file of `bytes` zeros (a decompression bomb: a few
    /// MB compressed), streamed through `gzip -1` without holding the tar in memory.
    pub fn zero_bomb_layer(mut self, bytes: u64) -> Self {
        use std::io::{Read, Write};
        struct Tee {
            hash: Sha256,
            out: std::process::ChildStdin,
        }
        impl Write for Tee {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let n = self.out.write(buf)?;
                self.hash.update(&buf[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                self.out.flush()
            }
        }
        let mut child = Command::new("gzip")
            .args(["-1", "-c"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run gzip: {e} (apt-get install gzip)"));
        let stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = child.stdout.take().expect("piped stdout");
        let reader = std::thread::spawn(move || {
            let mut blob = Vec::new();
            std::io::Read::read_to_end(&mut stdout, &mut blob).expect("read gzip output");
            blob
        });
        let mut tar = tar::Builder::new(Tee {
            hash: Sha256::new(),
            out: stdin,
        });
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, "zeros", std::io::repeat(0).take(bytes))
            .expect("stream the bomb");
        let tee = tar.into_inner().expect("finish tar");
        let diff_id = format!("sha256:{}", hex::encode(tee.hash.finalize()));
        drop(tee.out);
        let blob = reader.join().expect("gzip reader");
        assert!(child.wait().expect("gzip").success(), "gzip failed");
        self.layers
            .push((blob, diff_id, "application/vnd.oci.image.layer.v1.tar+gzip"));
        self
    }

    /// Makes the config give layer `index` a diff_id that its blob does not have.
    pub fn lie_about_diff_id(mut self, index: usize) -> Self {
        self.layers[index].1 = sha256(b"not what the layer holds");
        self
    }

    pub fn cmd(mut self, cmd: &[&str]) -> Self {
        self.cmd = cmd.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn entrypoint(mut self, e: &[&str]) -> Self {
        self.entrypoint = e.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn env(mut self, kv: &str) -> Self {
        self.env.push(kv.to_string());
        self
    }

    pub fn working_dir(mut self, dir: &str) -> Self {
        self.working_dir = dir.to_string();
        self
    }

    /// Writes an OCI layout with one image tagged `tag` and returns the manifest digest.
    pub fn write_layout(&self, dir: &Path, tag: &str) -> String {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).expect("create layout");
        let put = |bytes: &[u8]| -> String {
            let digest = sha256(bytes);
            fs::write(blobs.join(&digest[7..]), bytes).expect("write blob");
            digest
        };
        let mut layer_descs = Vec::new();
        for (blob, _, media) in &self.layers {
            let digest = put(blob);
            layer_descs.push(
                serde_json::json!({"mediaType": media, "digest": digest, "size": blob.len()}),
            );
        }
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Entrypoint": if self.entrypoint.is_empty() { serde_json::Value::Null } else { serde_json::json!(self.entrypoint) },
                "Cmd": self.cmd,
                "Env": self.env,
                "WorkingDir": self.working_dir,
                "ExposedPorts": {"8080/tcp": {}},
            },
            "rootfs": {"type": "layers", "diff_ids": self.layers.iter().map(|l| l.1.clone()).collect::<Vec<_>>()},
        });
        let config_bytes = serde_json::to_vec(&config).expect("config json");
        let config_digest = put(&config_bytes);
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_bytes.len()},
            "layers": layer_descs,
        });
        let manifest_bytes = serde_json::to_vec(&manifest).expect("manifest json");
        let manifest_digest = put(&manifest_bytes);
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest_bytes.len(),
                "annotations": {"org.opencontainers.image.ref.name": tag},
                "platform": {"architecture": "amd64", "os": "linux"},
            }],
        });
        fs::write(
            dir.join("index.json"),
            serde_json::to_vec(&index).expect("index"),
        )
        .expect("write index");
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .expect("write oci-layout");
        manifest_digest
    }
}

/// Builds a tar archive in memory.
pub struct TarBuilder {
    builder: tar::Builder<Vec<u8>>,
}

impl Default for TarBuilder {
    fn default() -> Self {
        TarBuilder::new()
    }
}

impl TarBuilder {
    pub fn new() -> TarBuilder {
        TarBuilder {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h
    }

    /// Writes the raw path bytes into the header, bypassing the tar crate's checks, so
    /// that hostile paths (`../x`, `/etc/x`) can be built.
    fn raw_path(h: &mut tar::Header, path: &str) {
        let name = &mut h.as_old_mut().name;
        assert!(path.len() < name.len(), "test path too long");
        name.fill(0);
        name[..path.len()].copy_from_slice(path.as_bytes());
    }

    fn raw_link(h: &mut tar::Header, target: &str) {
        let link = &mut h.as_old_mut().linkname;
        assert!(target.len() < link.len(), "test link too long");
        link.fill(0);
        link[..target.len()].copy_from_slice(target.as_bytes());
    }

    fn append(&mut self, mut h: tar::Header, data: &[u8]) {
        h.set_cksum();
        self.builder.append(&h, data).expect("append tar entry");
    }

    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        Self::raw_path(&mut h, path);
        self.append(h, &[]);
        self
    }

    pub fn file(mut self, path: &str, mode: u32, data: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        Self::raw_path(&mut h, path);
        self.append(h, data);
        self
    }

    pub fn owned_file(mut self, path: &str, mode: u32, uid: u64, gid: u64, data: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        Self::raw_path(&mut h, path);
        self.append(h, data);
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        Self::raw_path(&mut h, path);
        Self::raw_link(&mut h, target);
        self.append(h, &[]);
        self
    }

    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0);
        Self::raw_path(&mut h, path);
        Self::raw_link(&mut h, target);
        self.append(h, &[]);
        self
    }

    pub fn char_device(mut self, path: &str, mode: u32, major: u32, minor: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Char, mode, 0);
        h.set_device_major(major).expect("major");
        h.set_device_minor(minor).expect("minor");
        Self::raw_path(&mut h, path);
        self.append(h, &[]);
        self
    }

    /// A regular file carrying an xattr in a PAX header.
    pub fn file_with_xattr(mut self, path: &str, data: &[u8], attr: &str, value: &[u8]) -> Self {
        let key = format!("SCHILY.xattr.{attr}");
        self.builder
            .append_pax_extensions([(key.as_str(), value)])
            .expect("pax header");
        self = self.file(path, 0o644, data);
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.builder.into_inner().expect("finish tar")
    }
}

/// A generated tree as a tar: `files` regular files of `bytes` each under `data<seed>/`,
/// spread over directories of 100, with content half pseudo-random and half text (so it compresses
/// about as well as real programs and libraries do). Same `seed`, same bytes.
pub fn generated_tree_tar(files: usize, bytes: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        // xorshift64*: fast, deterministic, good enough to defeat compression.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut tar = TarBuilder::new();
    let mut data = vec![0u8; bytes];
    for i in 0..files {
        if i % 100 == 0 {
            tar = tar.dir(&format!("data{seed}/d{:05}", i / 100), 0o755);
        }
        let random = bytes / 2;
        for chunk in data[..random].chunks_mut(8) {
            let r = next().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
        for (j, b) in data[random..].iter_mut().enumerate() {
            *b = b"the quick brown fox jumps over the lazy dog\n"[(i + j) % 44];
        }
        tar = tar.file(&format!("data{seed}/d{:05}/f{i:07}", i / 100), 0o644, &data);
    }
    tar.finish()
}

/// The real Alpine 3.23 root filesystem as a tar (from the rootfs tarball that
/// `scripts/make-alpine-rootfs.sh` caches).
pub fn alpine_layer_tar() -> Vec<u8> {
    let tarball = repo_script_path("make-alpine-rootfs.sh");
    fs::read(&tarball).unwrap_or_else(|e| panic!("cannot read {}: {e}", tarball.display()))
}

/// The real Alpine 3.23 root filesystem as an OCI layout, built once per machine from the
/// rootfs tarball that `scripts/make-alpine-rootfs.sh` caches (keyed by that tarball).
pub fn alpine_layout() -> PathBuf {
    let tarball = repo_script_path("make-alpine-rootfs.sh");
    let name = tarball
        .file_stem()
        .expect("tarball name")
        .to_string_lossy()
        .into_owned();
    let layout = tarball.with_file_name(format!("{name}-oci"));
    if layout.join("index.json").exists() {
        return layout;
    }
    let tar =
        fs::read(&tarball).unwrap_or_else(|e| panic!("cannot read {}: {e}", tarball.display()));
    let tmp = layout.with_extension("tmp");
    let _ = fs::remove_dir_all(&tmp);
    ImageBuilder::new()
        .layer(&tar, LayerCompression::Gzip)
        .cmd(&["/bin/sh"])
        .write_layout(&tmp, "3.23");
    fs::rename(&tmp, &layout).expect("publish alpine layout");
    layout
}

/// An Alpine 3.23 web-app image: the real Alpine root plus a layer with a static busybox
/// (Debian's busybox-static, which has `httpd`) serving `/srv/index.html` (= `page`) on
/// port 8080. Written as an OCI layout tagged "1".
pub fn alpine_web_image(out: &Path, page: &[u8]) {
    alpine_web_builder(page).write_layout(out, "1");
}

/// The image of [`alpine_web_image`], to add layers to before writing it.
pub fn alpine_web_builder(page: &[u8]) -> ImageBuilder {
    let busybox = fs::read("/bin/busybox").unwrap_or_else(|e| {
        panic!("cannot read /bin/busybox ({e}): apt-get install busybox-static (`make setup`)")
    });
    let web = TarBuilder::new()
        .dir("usr/local/bin/", 0o755)
        .file("usr/local/bin/busybox-httpd", 0o755, &busybox)
        .dir("srv/", 0o755)
        .file("srv/index.html", 0o644, page)
        .finish();
    ImageBuilder::new()
        .layer(&alpine_layer_tar(), LayerCompression::Gzip)
        .layer(&web, LayerCompression::Gzip)
        .cmd(&[
            "/usr/local/bin/busybox-httpd",
            "httpd",
            "-f",
            "-p",
            "8080",
            "-h",
            "/srv",
        ])
}

/// A layer holding the static `swg-counter` test app as `/usr/local/bin/swg-counter`
/// (an HTTP server on port 8080 that counts `/count` requests in memory, never forking).
pub fn counter_layer() -> Vec<u8> {
    let bin = crate::guest::counter_binary();
    let bytes = fs::read(&bin).unwrap_or_else(|e| panic!("cannot read {}: {e}", bin.display()));
    TarBuilder::new()
        .dir("usr/local/bin/", 0o755)
        .file("usr/local/bin/swg-counter", 0o755, &bytes)
        .finish()
}

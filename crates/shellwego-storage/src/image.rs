//! The image store: pulls OCI images with `oci-client`, verifies them, and keeps their
//! layers in a cache by digest that all images share.
//!
//! Layout under the store's root:
//! ```text
//! blobs/sha256/<hex>        compressed layers, each verified (digest and diff_id) before it
//!                           is moved into place, so a file here is always whole and correct
//! images/<hex>.json         one pulled image (manifest digest <hex>): config and layers
//! tmp/                      downloads in progress
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWrite;
use tracing::info;

/// Why an image could not be pulled or read.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image reference {reference:?} does not parse: {reason}")]
    BadReference { reference: String, reason: String },
    #[error("registry error for {reference}: {source}")]
    Registry {
        reference: String,
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    #[error("{what} of {reference}: expected digest {expected}, got {actual}")]
    DigestMismatch {
        reference: String,
        what: String,
        expected: String,
        actual: String,
    },
    #[error("image {reference} is invalid: {reason}")]
    Invalid { reference: String, reason: String },
    #[error("layer {digest} has unsupported media type {media_type}")]
    UnsupportedLayer { digest: String, media_type: String },
    #[error("image store I/O at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image {0} is not in the store")]
    NotFound(String),
}

fn io_at(path: &Path) -> impl Fn(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The parts of an image's config that decide how its process runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
    pub exposed_ports: Vec<String>,
}

/// How a layer's bytes are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    fn from_media_type(media_type: &str, digest: &str) -> Result<Compression, ImageError> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Ok(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd" => Ok(Compression::Zstd),
            _ => Err(ImageError::UnsupportedLayer {
                digest: digest.to_string(),
                media_type: media_type.to_string(),
            }),
        }
    }
}

/// One layer of a pulled image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// Digest of the compressed blob (`sha256:...`).
    pub digest: String,
    /// Digest of the uncompressed tar (`sha256:...`), from the config's `rootfs.diff_ids`.
    pub diff_id: String,
    pub compression: Compression,
    pub size: u64,
}

/// A pulled, verified image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PulledImage {
    /// The references this image was pulled by, fully qualified.
    pub references: Vec<String>,
    /// Digest of the platform manifest (`sha256:...`): the image's identity.
    pub digest: String,
    pub config: ImageConfig,
    pub layers: Vec<Layer>,
}

impl PulledImage {
    /// The digest's hex part, for names (datasets, files).
    pub fn digest_hex(&self) -> &str {
        self.digest.strip_prefix("sha256:").unwrap_or(&self.digest)
    }

    /// Compressed size of all layers.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

/// What `pull` reports as it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The manifest is known: this many layers, this many compressed bytes.
    Resolved { layers: usize, bytes: u64 },
    /// A layer was already in the cache.
    Cached { digest: String, bytes: u64 },
    /// Bytes of a layer downloaded so far.
    Downloading {
        digest: String,
        done: u64,
        total: u64,
    },
    /// A layer was downloaded and verified.
    Verified { digest: String },
}

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    Basic { username: String, password: String },
    Bearer(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
            Credentials::Bearer(_) => write!(f, "Bearer(***)"),
        }
    }
}

/// How the store talks to registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// Registries (`host:port`) spoken to over plain HTTP. Everything else needs HTTPS.
    pub insecure: Vec<String>,
    /// Credentials by registry host; anonymous (with token auth where the registry asks
    /// for it) otherwise.
    pub credentials: BTreeMap<String, Credentials>,
}

/// Parses a user's image reference: `alpine:3.23` is `docker.io/library/alpine:3.23`.
pub fn parse_reference(text: &str) -> Result<Reference, ImageError> {
    let bad = |reason: String| ImageError::BadReference {
        reference: text.to_string(),
        reason,
    };
    if text.trim() != text || text.is_empty() {
        return Err(bad("must not be empty or have surrounding spaces".into()));
    }
    Reference::from_str(text).map_err(|e| bad(e.to_string()))
}

/// Where pulled images and their layers live.
pub struct ImageStore {
    root: PathBuf,
    client: Client,
    registries: RegistryConfig,
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn hex_of(digest: &str) -> Result<&str, ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(h),
        _ => Err(ImageError::Invalid {
            reference: digest.to_string(),
            reason: "only well-formed sha256 digests are supported".into(),
        }),
    }
}

/// Writes through to a file while hashing and counting.
struct HashingWriter<'a> {
    inner: tokio::fs::File,
    hasher: Sha256,
    done: u64,
    total: u64,
    digest: String,
    progress: &'a (dyn Fn(Progress) + Send + Sync),
    last_report: u64,
}

impl AsyncWrite for HashingWriter<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.hasher.update(&buf[..n]);
                this.done += n as u64;
                if this.done - this.last_report >= 1 << 20 || this.done == this.total {
                    this.last_report = this.done;
                    (this.progress)(Progress::Downloading {
                        digest: this.digest.clone(),
                        done: this.done,
                        total: this.total,
                    });
                }
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The image config as registries serve it (Docker and OCI share these keys).
#[derive(Deserialize)]
struct RawConfigFile {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<RawRunConfig>,
    rootfs: RawRootfs,
}

#[derive(Deserialize, Default)]
struct RawRunConfig {
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
    #[serde(rename = "ExposedPorts", default)]
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Deserialize)]
struct RawRootfs {
    diff_ids: Vec<String>,
}

/// Opens a layer's tar stream, decompressing as needed.
pub fn open_layer(path: &Path, compression: Compression) -> io::Result<Box<dyn Read + Send>> {
    let file = io::BufReader::new(fs::File::open(path)?);
    Ok(match compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(file)?),
    })
}

/// sha256 of a layer's uncompressed tar.
fn diff_id_of(path: &Path, compression: Compression) -> io::Result<String> {
    let mut reader = open_layer(path, compression)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

impl ImageStore {
    /// Opens (creating) a store under `root`.
    pub fn open(root: &Path, registries: RegistryConfig) -> Result<ImageStore, ImageError> {
        for sub in ["blobs/sha256", "images", "tmp"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        }
        // rustls needs one process-wide crypto provider; a second install is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let protocol = if registries.insecure.is_empty() {
            ClientProtocol::Https
        } else {
            ClientProtocol::HttpsExcept(registries.insecure.clone())
        };
        let client = Client::new(ClientConfig {
            protocol,
            platform_resolver: Some(Box::new(oci_client::client::linux_amd64_resolver)),
            ..ClientConfig::default()
        });
        Ok(ImageStore {
            root: root.to_path_buf(),
            client,
            registries,
        })
    }

    /// Where a verified layer blob lives.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("blobs/sha256").join(hex_of(digest)?))
    }

    /// Opens a cached layer's uncompressed tar stream.
    pub fn open_layer(&self, layer: &Layer) -> Result<Box<dyn Read + Send>, ImageError> {
        let path = self.blob_path(&layer.digest)?;
        open_layer(&path, layer.compression).map_err(io_at(&path))
    }

    fn auth_for(&self, reference: &Reference) -> RegistryAuth {
        match self
            .registries
            .credentials
            .get(reference.resolve_registry())
        {
            Some(Credentials::Basic { username, password }) => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
            Some(Credentials::Bearer(token)) => RegistryAuth::Bearer(token.clone()),
            None => RegistryAuth::Anonymous,
        }
    }

    /// Pulls an image: resolves an index to its linux/amd64 manifest, verifies the
    /// manifest, config and every layer (blob digest and uncompressed diff_id), and
    /// downloads only layers the cache lacks.
    pub async fn pull(
        &self,
        reference: &str,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<PulledImage, ImageError> {
        let parsed = parse_reference(reference)?;
        let whole = parsed.whole();
        let registry_err = |source| ImageError::Registry {
            reference: whole.clone(),
            source,
        };
        let auth = self.auth_for(&parsed);
        let (manifest, digest, config_json) = self
            .client
            .pull_manifest_and_config(&parsed, &auth)
            .await
            .map_err(registry_err)?;
        // oci-client checks the manifest's bytes against the registry's digest header and
        // against the digest in the reference, if it has one.
        let config_digest = sha256_hex(config_json.as_bytes());
        if config_digest != manifest.config.digest {
            return Err(ImageError::DigestMismatch {
                reference: whole,
                what: "config".into(),
                expected: manifest.config.digest.clone(),
                actual: config_digest,
            });
        }
        let raw: RawConfigFile =
            serde_json::from_str(&config_json).map_err(|e| ImageError::Invalid {
                reference: whole.clone(),
                reason: format!("config JSON: {e}"),
            })?;
        if (!raw.os.is_empty() && raw.os != "linux")
            || (!raw.architecture.is_empty() && raw.architecture != "amd64")
        {
            return Err(ImageError::Invalid {
                reference: whole,
                reason: format!(
                    "platform {}/{} is not linux/amd64",
                    raw.os, raw.architecture
                ),
            });
        }
        if raw.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(ImageError::Invalid {
                reference: whole,
                reason: format!(
                    "{} layers but {} diff_ids in the config",
                    manifest.layers.len(),
                    raw.rootfs.diff_ids.len()
                ),
            });
        }
        let mut layers = Vec::new();
        for (desc, diff_id) in manifest.layers.iter().zip(&raw.rootfs.diff_ids) {
            hex_of(&desc.digest)?;
            hex_of(diff_id)?;
            layers.push(Layer {
                digest: desc.digest.clone(),
                diff_id: diff_id.clone(),
                compression: Compression::from_media_type(&desc.media_type, &desc.digest)?,
                size: u64::try_from(desc.size).unwrap_or(0),
            });
        }
        progress(Progress::Resolved {
            layers: layers.len(),
            bytes: layers.iter().map(|l| l.size).sum(),
        });
        for (layer, desc) in layers.iter().zip(&manifest.layers) {
            self.fetch_layer(&parsed, &whole, layer, desc, progress)
                .await?;
        }
        let rc = raw.config.unwrap_or_default();
        let image = PulledImage {
            references: vec![whole],
            digest,
            config: ImageConfig {
                entrypoint: rc.entrypoint.unwrap_or_default(),
                cmd: rc.cmd.unwrap_or_default(),
                env: rc.env.unwrap_or_default(),
                working_dir: rc.working_dir.unwrap_or_default(),
                user: rc.user.unwrap_or_default(),
                exposed_ports: rc.exposed_ports.unwrap_or_default().into_keys().collect(),
            },
            layers,
        };
        self.record(image)
    }

    async fn fetch_layer(
        &self,
        reference: &Reference,
        whole: &str,
        layer: &Layer,
        desc: &OciDescriptor,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<(), ImageError> {
        let final_path = self.blob_path(&layer.digest)?;
        if final_path.exists() {
            progress(Progress::Cached {
                digest: layer.digest.clone(),
                bytes: layer.size,
            });
            return Ok(());
        }
        let tmp = self.root.join("tmp").join(format!(
            "{}.{}",
            hex_of(&layer.digest)?,
            std::process::id()
        ));
        let file = tokio::fs::File::create(&tmp).await.map_err(io_at(&tmp))?;
        let mut writer = HashingWriter {
            inner: file,
            hasher: Sha256::new(),
            done: 0,
            total: layer.size,
            digest: layer.digest.clone(),
            progress,
            last_report: 0,
        };
        let result = self.client.pull_blob(reference, desc, &mut writer).await;
        let actual = format!("sha256:{}", hex::encode(writer.hasher.finalize()));
        drop(writer.inner);
        let cleanup = |e: ImageError| {
            let _ = fs::remove_file(&tmp);
            e
        };
        result.map_err(|source| {
            cleanup(ImageError::Registry {
                reference: whole.to_string(),
                source,
            })
        })?;
        if actual != layer.digest {
            return Err(cleanup(ImageError::DigestMismatch {
                reference: whole.to_string(),
                what: "layer".into(),
                expected: layer.digest.clone(),
                actual,
            }));
        }
        let tmp_for_hash = tmp.clone();
        let compression = layer.compression;
        let diff_id = tokio::task::spawn_blocking(move || diff_id_of(&tmp_for_hash, compression))
            .await
            .map_err(|e| cleanup(io_at(&tmp)(io::Error::other(e))))?
            .map_err(|e| cleanup(io_at(&tmp)(e)))?;
        if diff_id != layer.diff_id {
            return Err(cleanup(ImageError::DigestMismatch {
                reference: whole.to_string(),
                what: "uncompressed layer (diff_id)".into(),
                expected: layer.diff_id.clone(),
                actual: diff_id,
            }));
        }
        fs::rename(&tmp, &final_path).map_err(|e| cleanup(io_at(&final_path)(e)))?;
        info!(digest = %layer.digest, bytes = layer.size, "layer verified");
        progress(Progress::Verified {
            digest: layer.digest.clone(),
        });
        Ok(())
    }

    fn image_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self
            .root
            .join("images")
            .join(format!("{}.json", hex_of(digest)?)))
    }

    /// Saves the image record (atomically), merging the references it is known by.
    fn record(&self, mut image: PulledImage) -> Result<PulledImage, ImageError> {
        let path = self.image_path(&image.digest)?;
        if let Ok(old) = self.get(&image.digest) {
            for r in old.references {
                if !image.references.contains(&r) {
                    image.references.push(r);
                }
            }
            image.references.sort();
        }
        let json =
            serde_json::to_vec_pretty(&image).map_err(|e| io_at(&path)(io::Error::other(e)))?;
        crate::atomic::write_file(&path, &json).map_err(io_at(&path))?;
        Ok(image)
    }

    /// A pulled image by digest (`sha256:...`).
    pub fn get(&self, digest: &str) -> Result<PulledImage, ImageError> {
        let path = self.image_path(digest)?;
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ImageError::NotFound(digest.to_string()))
            }
            Err(e) => return Err(io_at(&path)(e)),
        };
        serde_json::from_slice(&bytes).map_err(|e| ImageError::Invalid {
            reference: digest.to_string(),
            reason: format!("{}: {e}", path.display()),
        })
    }

    /// Every pulled image, by digest.
    pub fn list(&self) -> Result<Vec<PulledImage>, ImageError> {
        let dir = self.root.join("images");
        let mut images = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_at(&dir))? {
            let entry = entry.map_err(io_at(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(hex) = name.strip_suffix(".json") {
                images.push(self.get(&format!("sha256:{hex}"))?);
            }
        }
        images.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(images)
    }

    /// Removes an image record and the layers no other image uses.
    pub fn remove(&self, digest: &str) -> Result<(), ImageError> {
        let image = self.get(digest)?;
        let path = self.image_path(digest)?;
        fs::remove_file(&path).map_err(io_at(&path))?;
        let still_used: Vec<String> = self
            .list()?
            .into_iter()
            .flat_map(|i| i.layers.into_iter().map(|l| l.digest))
            .collect();
        for layer in image.layers {
            if !still_used.contains(&layer.digest) {
                let blob = self.blob_path(&layer.digest)?;
                match fs::remove_file(&blob) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_at(&blob)(e)),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = parse_reference("alpine:3.23").unwrap();
        assert_eq!(r.whole(), "docker.io/library/alpine:3.23");
        let r = parse_reference("127.0.0.1:5000/test/alpine:3.23").unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "test/alpine");
        let d = format!("alpine@sha256:{}", "a".repeat(64));
        assert!(parse_reference(&d).unwrap().digest().is_some());
        for bad in [
            "",
            " alpine",
            "Alpine:UPPER!",
            "alpine@sha256:zz",
            "a:b:c:d",
        ] {
            let err = parse_reference(bad).unwrap_err();
            assert!(err.to_string().contains("does not parse"), "{bad}: {err}");
        }
    }

    #[test]
    fn media_types() {
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd", "d")
                .unwrap(),
            Compression::Zstd
        );
        assert!(Compression::from_media_type("application/wasm", "d").is_err());
    }

    #[test]
    fn credentials_are_not_printed() {
        let c = Credentials::Basic {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}

//! The image store: resolves OCI images with `oci-client` (manifest and config, both
//! verified), keeps their layers in a cache by digest that all images share, and records
//! the images it pulled. Layers are fetched and checked in one pass by [`crate::fetch`].
//!
//! Layout under the store's root:
//! ```text
//! blobs/sha256/<hex>        compressed layers, moved into place only after their size and
//!                           digest were checked (their diff_id is checked on every unpack)
//! images/<hex>.json         one pulled image (manifest digest <hex>): config and layers
//! tmp/                      downloads in progress (swept when the store opens)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::layer::LayerStreamError;

use crate::spool::{Spool, SpoolError};

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
    #[error("registry {registry}: the {what} of {reference} did not arrive within {limit:?}")]
    Deadline {
        registry: String,
        what: &'static str,
        reference: String,
        limit: Duration,
    },
    #[error("image {0} is not in the store")]
    NotFound(String),
    #[error("layer {digest} of {reference}: {source}")]
    Layer {
        reference: String,
        digest: String,
        #[source]
        source: LayerFailure,
    },
}

/// What went wrong with one layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerFailure {
    /// The compressed blob did not arrive whole and correct.
    #[error(transparent)]
    Blob(SpoolError),
    /// Its uncompressed stream was wrong or over budget.
    #[error(transparent)]
    Stream(LayerStreamError),
}

/// Limits on what one image may make the node do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageBudget {
    /// Uncompressed bytes of all layers together (a zip bomb stops here).
    pub max_unpacked_bytes: u64,
    /// Archive entries of all layers together.
    pub max_entries: u64,
    /// The image config blob (JSON; 4 MiB, as skopeo and containerd allow).
    pub max_config_bytes: u64,
    /// Layers downloaded at once (the store's total, across pulls).
    pub parallel_downloads: usize,
    /// Connecting to a registry.
    pub connect_timeout: Duration,
    /// Waiting for the next bytes from a registry.
    pub read_timeout: Duration,
    /// The whole of one manifest or config request (token exchange included): the read
    /// timeout alone lets a registry that trickles a byte now and then hold a pull forever.
    pub request_timeout: Duration,
    /// What a layer download may take at least; it gets [`Self::blob_min_rate`] on top.
    pub blob_timeout: Duration,
    /// Bytes per second a layer download must average (beyond [`Self::blob_timeout`]).
    pub blob_min_rate: u64,
}

impl ImageBudget {
    /// How long the download of a blob of `size` bytes may take in all.
    pub fn blob_deadline(&self, size: u64) -> Duration {
        self.blob_timeout
            .saturating_add(Duration::from_secs(size / self.blob_min_rate.max(1)))
    }
}

impl Default for ImageBudget {
    fn default() -> ImageBudget {
        ImageBudget {
            max_unpacked_bytes: 2 << 30,
            max_entries: 500_000,
            max_config_bytes: 4 << 20,
            parallel_downloads: 3,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            // A manifest or config is a few KiB: a minute is slow even for a distant
            // registry behind a token service.
            request_timeout: Duration::from_secs(60),
            // A layer gets a minute plus a second per 256 KiB: a 100 MiB layer 7 minutes.
            blob_timeout: Duration::from_secs(60),
            blob_min_rate: 256 << 10,
        }
    }
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

/// What a pull reports as it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The manifest is known: this many layers, this many compressed bytes.
    Resolved { layers: usize, bytes: u64 },
    /// A layer was already in the cache.
    Cached { digest: String, bytes: u64 },
    /// Bytes of a layer downloaded so far, `elapsed` after its download started
    /// (reported about once a second while a download runs).
    Downloading {
        digest: String,
        done: u64,
        total: u64,
        elapsed: Duration,
    },
    /// A layer was downloaded whole, with the right size and digest.
    Verified {
        digest: String,
        bytes: u64,
        elapsed: Duration,
    },
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

/// `sha256:0123456789ab`: enough of a digest to tell layers apart.
pub fn short_digest(digest: &str) -> &str {
    &digest[..digest.len().min(19)]
}

impl Progress {
    /// One line for a person: bytes, rate and time left of a download.
    pub fn describe(&self) -> String {
        match self {
            Progress::Resolved { layers, bytes } => {
                format!("{layers} layer(s), {:.1} MiB compressed", mib(*bytes))
            }
            Progress::Cached { digest, bytes } => {
                format!(
                    "layer {} cached ({:.1} MiB)",
                    short_digest(digest),
                    mib(*bytes)
                )
            }
            Progress::Downloading {
                digest,
                done,
                total,
                elapsed,
            } => {
                let secs = elapsed.as_secs_f64();
                let rate = if secs > 0.0 { *done as f64 / secs } else { 0.0 };
                let eta = if rate > 0.0 {
                    format!("{:.0} s left", total.saturating_sub(*done) as f64 / rate)
                } else {
                    "waiting for data".to_string()
                };
                format!(
                    "layer {} {:.1}/{:.1} MiB, {:.1} MiB/s, {eta}",
                    short_digest(digest),
                    mib(*done),
                    mib(*total),
                    mib(rate as u64)
                )
            }
            Progress::Verified {
                digest,
                bytes,
                elapsed,
            } => format!(
                "layer {} downloaded and verified ({:.1} MiB in {:.1} s)",
                short_digest(digest),
                mib(*bytes),
                elapsed.as_secs_f64()
            ),
        }
    }
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

/// Removes downloads that a process which is gone left in `tmp/` (their names end in
/// `.PID.N`); those of live processes (another store on this root) are kept.
fn sweep_stale_downloads(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name.rsplit('.').nth(1).and_then(|p| p.parse::<u32>().ok());
        if pid.is_none_or(|pid| !shellwego_sys::process::exists(pid)) {
            let _ = fs::remove_file(entry.path());
        }
    }
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
    pub(crate) client: Client,
    registries: RegistryConfig,
    pub(crate) budget: ImageBudget,
    /// Downloads in progress by layer digest, so concurrent pulls share one.
    pub(crate) inflight: Mutex<HashMap<String, Weak<Spool>>>,
    pub(crate) download_slots: Arc<tokio::sync::Semaphore>,
}

/// An image whose manifest and config were fetched and checked; its layers not yet.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub image: PulledImage,
    pub reference: Reference,
    /// The manifest's layer descriptors, in layer order.
    pub descriptors: Vec<OciDescriptor>,
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

pub(crate) fn hex_of(digest: &str) -> Result<&str, ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(h),
        _ => Err(ImageError::Invalid {
            reference: digest.to_string(),
            reason: "only well-formed sha256 digests are supported".into(),
        }),
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

impl ImageStore {
    /// Opens (creating) a store under `root`, with the default budget.
    pub fn open(root: &Path, registries: RegistryConfig) -> Result<ImageStore, ImageError> {
        ImageStore::open_with(root, registries, ImageBudget::default())
    }

    /// Opens (creating) a store under `root`. Downloads that an earlier process left
    /// unfinished in `tmp/` are removed.
    pub fn open_with(
        root: &Path,
        registries: RegistryConfig,
        budget: ImageBudget,
    ) -> Result<ImageStore, ImageError> {
        for sub in ["blobs/sha256", "images", "tmp"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        }
        sweep_stale_downloads(&root.join("tmp"));
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
            connect_timeout: Some(budget.connect_timeout),
            read_timeout: Some(budget.read_timeout),
            ..ClientConfig::default()
        });
        Ok(ImageStore {
            root: root.to_path_buf(),
            client,
            registries,
            budget,
            inflight: Mutex::new(HashMap::new()),
            download_slots: Arc::new(tokio::sync::Semaphore::new(
                budget.parallel_downloads.max(1),
            )),
        })
    }

    pub fn budget(&self) -> ImageBudget {
        self.budget
    }

    /// Where a verified layer blob lives.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("blobs/sha256").join(hex_of(digest)?))
    }

    /// Where downloads in progress are written.
    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
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

    /// The image's config blob, read only up to its descriptor's size, which must be within
    /// the budget's `max_config_bytes` (a registry cannot feed the agent an endless config).
    async fn pull_config(
        &self,
        reference: &Reference,
        desc: &OciDescriptor,
        whole: &str,
    ) -> Result<String, ImageError> {
        use futures_util::StreamExt;
        let invalid = |reason: String| ImageError::Invalid {
            reference: whole.to_string(),
            reason,
        };
        let limit = self.budget.max_config_bytes;
        let size = usize::try_from(desc.size)
            .ok()
            .filter(|s| *s as u64 <= limit)
            .ok_or_else(|| {
                invalid(format!(
                    "its config is {} bytes, more than the limit of {limit} bytes",
                    desc.size
                ))
            })?;
        let response = self
            .client
            .pull_blob_stream_partial(reference, desc, 0, None)
            .await
            .map_err(|source| ImageError::Registry {
                reference: whole.to_string(),
                source,
            })?;
        let mut stream = match response {
            oci_client::client::BlobResponse::Full(s)
            | oci_client::client::BlobResponse::Partial(s) => s.stream,
        };
        let mut bytes = Vec::with_capacity(size);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| invalid(format!("reading its config: {e}")))?;
            if bytes.len() + chunk.len() > size {
                return Err(invalid(format!(
                    "its config blob is longer than the {size} bytes its descriptor names"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        String::from_utf8(bytes).map_err(|_| invalid("its config is not UTF-8".into()))
    }

    /// Awaits one request to the registry of `reference` for at most the budget's
    /// `request_timeout`; the error names the registry, what was asked and the limit.
    async fn within<T>(
        &self,
        reference: &Reference,
        what: &'static str,
        request: impl std::future::Future<Output = Result<T, ImageError>>,
    ) -> Result<T, ImageError> {
        let limit = self.budget.request_timeout;
        tokio::time::timeout(limit, request)
            .await
            .unwrap_or_else(|_| {
                Err(ImageError::Deadline {
                    registry: reference.resolve_registry().to_string(),
                    what,
                    reference: reference.whole(),
                    limit,
                })
            })
    }

    /// Resolves an image: an index to its linux/amd64 manifest; checks the manifest
    /// (by oci-client, against the registry's digest and the reference's) and the config
    /// (against the manifest). Fetches no layer. The manifest and the config each have
    /// the budget's `request_timeout`.
    pub async fn resolve(&self, reference: &str) -> Result<Resolved, ImageError> {
        let parsed = parse_reference(reference)?;
        let whole = parsed.whole();
        let registry_err = |source| ImageError::Registry {
            reference: whole.clone(),
            source,
        };
        let auth = self.auth_for(&parsed);
        let manifest = async {
            self.client
                .pull_image_manifest(&parsed, &auth)
                .await
                .map_err(registry_err)
        };
        let (manifest, digest) = self.within(&parsed, "manifest", manifest).await?;
        let config = self.pull_config(&parsed, &manifest.config, &whole);
        let config_json = self.within(&parsed, "config", config).await?;
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
                size: u64::try_from(desc.size).map_err(|_| ImageError::Invalid {
                    reference: whole.clone(),
                    reason: format!("layer {} has a negative size", desc.digest),
                })?,
            });
        }
        // Compressed bytes beyond the uncompressed budget cannot be a valid image within
        // it; refusing here keeps a manifest of huge layers from filling the disk.
        let compressed: u64 = layers.iter().map(|l| l.size).sum();
        if compressed > self.budget.max_unpacked_bytes {
            return Err(ImageError::Invalid {
                reference: whole,
                reason: format!(
                    "its layers are {compressed} bytes compressed, more than the budget of {} bytes",
                    self.budget.max_unpacked_bytes
                ),
            });
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
        Ok(Resolved {
            image,
            reference: parsed,
            descriptors: manifest.layers,
        })
    }

    /// Pulls an image into the cache: resolves it and fetches the layers the cache lacks
    /// (in parallel), each checked in one pass (size, digest, and diff_id while it is
    /// decompressed). Building a root disk needs no separate pull:
    /// [`crate::RootfsBuilder::pull_base`] unpacks in that same pass.
    pub async fn pull(
        &self,
        reference: &str,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<PulledImage, ImageError> {
        let resolved = self.resolve(reference).await?;
        let fetch = Arc::new(self.fetch(&resolved)?);
        let checking = fetch.clone();
        let check = tokio::task::spawn_blocking(move || checking.verify_downloaded());
        crate::fetch::drive(check, &fetch, progress)
            .await
            .map_err(|e| io_at(&self.root)(io::Error::other(e)))??;
        self.record(resolved.image)
    }

    fn image_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self
            .root
            .join("images")
            .join(format!("{}.json", hex_of(digest)?)))
    }

    /// Saves the image record (atomically), merging the references it is known by.
    pub(crate) fn record(&self, mut image: PulledImage) -> Result<PulledImage, ImageError> {
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
        shellwego_sys::atomic::write_file(&path, &json).map_err(io_at(&path))?;
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

    fn store_for(registry: &str, budget: ImageBudget) -> (tempfile::TempDir, ImageStore) {
        let dir = tempfile::tempdir().unwrap();
        let registries = RegistryConfig {
            insecure: vec![registry.to_string()],
            ..Default::default()
        };
        let store = ImageStore::open_with(dir.path(), registries, budget).unwrap();
        (dir, store)
    }

    /// A read timeout far beyond the test's request deadline: only the deadline can end
    /// these requests in time.
    fn patient(request_timeout: Duration) -> ImageBudget {
        ImageBudget {
            read_timeout: Duration::from_secs(30),
            request_timeout,
            ..ImageBudget::default()
        }
    }

    #[tokio::test]
    async fn tc_u14_deadline_a_registry_that_never_answers_fails_the_manifest_naming_it() {
        let registry = crate::testserver::silent();
        let (_dir, store) = store_for(&registry, patient(Duration::from_millis(300)));
        let start = std::time::Instant::now();
        let e = store
            .resolve(&format!("{registry}/test/app:1"))
            .await
            .unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        assert!(matches!(e, ImageError::Deadline { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains(&registry) && text.contains("manifest") && text.contains("300ms"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn tc_u14_deadline_a_registry_that_trickles_fails_within_the_request_deadline() {
        let head =
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n";
        let registry = crate::testserver::trickling(head, Duration::from_millis(20));
        let (_dir, store) = store_for(&registry, patient(Duration::from_millis(400)));
        let start = std::time::Instant::now();
        let e = store
            .resolve(&format!("{registry}/test/app:1"))
            .await
            .unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        let text = e.to_string();
        assert!(text.contains(&registry) && text.contains("400ms"), "{text}");
    }

    #[test]
    fn blob_deadlines_grow_with_size() {
        let b = ImageBudget::default();
        assert_eq!(b.blob_deadline(0), Duration::from_secs(60));
        assert_eq!(b.blob_deadline(100 << 20), Duration::from_secs(60 + 400));
        let no_rate = ImageBudget {
            blob_min_rate: 0,
            ..b
        };
        assert_eq!(no_rate.blob_deadline(u64::MAX), Duration::MAX);
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

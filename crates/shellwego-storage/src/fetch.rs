//! Fetching an image's layers in one pass.
//!
//! For each layer the cache lacks, a task downloads the blob into a [`Spool`]: a file in
//! `tmp/` that is hashed as it is written and becomes the cached blob once its size and
//! digest are right. Up to [`ImageBudget::parallel_downloads`] layers download at once, in
//! layer order; concurrent pulls of one layer share its download. Consumers read layers in
//! order on blocking threads through [`LayerFetch::open`], while later layers are still
//! downloading: decompression, the diff_id check and unpacking happen as the bytes arrive.
//!
//! A blob that ends short, runs past its size, has the wrong digest or is cut off by the
//! registry is never moved into the cache; its temp file is removed, and whoever reads it
//! gets that failure naming the layer.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use oci_client::client::BlobResponse;
use oci_client::manifest::OciDescriptor;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, info, warn};

use crate::image::{
    hex_of, ImageBudget, ImageError, ImageStore, Layer, LayerFailure, Progress, Resolved,
};
use crate::layer::{LayerStreamError, LayerTar};
use crate::spool::{Spool, SpoolError, SpoolWriter};

/// Chunks in flight between the network and the writer thread (each up to a few KiB to
/// a few hundred KiB).
const CHANNEL_CHUNKS: usize = 64;

static DOWNLOAD_SEQ: AtomicU64 = AtomicU64::new(0);

/// How long a consumer that failed waits for its blob's download to end, to blame the
/// blob (digest, cut-off) rather than the symptom it caused in the stream.
const BLAME_WAIT: Duration = Duration::from_secs(30);

/// One layer being fetched (or read from the cache).
struct Fetched {
    layer: Layer,
    spool: Arc<Spool>,
    /// True when the blob came from the cache (no download in this fetch).
    cached: bool,
    started: Instant,
}

/// The layers of one image, as they arrive.
pub struct LayerFetch {
    reference: String,
    layers: Vec<Fetched>,
    budget: ImageBudget,
    blobs: Vec<PathBuf>,
}

impl ImageStore {
    /// Starts fetching the layers of `resolved` that the cache lacks (must be called
    /// within a tokio runtime: downloads are tasks of their own, so they finish and fill
    /// the cache even if the caller gives up).
    pub fn fetch(&self, resolved: &Resolved) -> Result<LayerFetch, ImageError> {
        let reference = resolved.reference.whole();
        let mut layers = Vec::new();
        let mut blobs = Vec::new();
        for (layer, desc) in resolved.image.layers.iter().zip(&resolved.descriptors) {
            let path = self.blob_path(&layer.digest)?;
            let (spool, cached) = self.spool_for(&resolved.reference, layer, desc, &path)?;
            blobs.push(path);
            layers.push(Fetched {
                layer: layer.clone(),
                spool,
                cached,
                started: Instant::now(),
            });
        }
        Ok(LayerFetch {
            reference,
            layers,
            budget: self.budget,
            blobs,
        })
    }

    /// A cached blob of the right size, the download in progress of another pull, or a
    /// new download.
    fn spool_for(
        &self,
        reference: &Reference,
        layer: &Layer,
        desc: &OciDescriptor,
        blob: &std::path::Path,
    ) -> Result<(Arc<Spool>, bool), ImageError> {
        let io = |e| ImageError::Io {
            path: blob.to_path_buf(),
            source: e,
        };
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        inflight.retain(|_, w| w.strong_count() > 0);
        if let Some(spool) = inflight.get(&layer.digest).and_then(|w| w.upgrade()) {
            if !matches!(spool.outcome(), Some(Err(_))) {
                debug!(digest = %layer.digest, "joining a download in progress");
                return Ok((spool, false));
            }
        }
        match std::fs::metadata(blob) {
            Ok(m) if m.len() == layer.size => {
                return Ok((Spool::complete(&layer.digest, blob).map_err(io)?, true));
            }
            Ok(_) => {
                warn!(blob = %blob.display(), "cached blob has the wrong size; fetching it again");
                let _ = std::fs::remove_file(blob);
            }
            Err(_) => {}
        }
        let tmp = self.tmp_dir().join(format!(
            "{}.{}.{}",
            hex_of(&layer.digest)?,
            std::process::id(),
            DOWNLOAD_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let (spool, writer) =
            Spool::create(&layer.digest, layer.size, &tmp).map_err(|e| ImageError::Io {
                path: tmp.clone(),
                source: e,
            })?;
        inflight.insert(layer.digest.clone(), Arc::downgrade(&spool));
        tokio::spawn(download(Download {
            client: self.client.clone(),
            reference: reference.clone(),
            desc: desc.clone(),
            blob: blob.to_path_buf(),
            writer,
            slots: self.download_slots.clone(),
            deadline: self.budget.blob_deadline(layer.size),
        }));
        Ok((spool, false))
    }
}

struct Download {
    client: Client,
    reference: Reference,
    desc: OciDescriptor,
    blob: PathBuf,
    writer: SpoolWriter,
    slots: Arc<Semaphore>,
    /// The whole download, from the request to the last byte (see
    /// [`ImageBudget::blob_deadline`]): a registry trickling bytes cannot hold a pull
    /// forever.
    deadline: Duration,
}

enum Chunk {
    Bytes(bytes::Bytes),
    Failed(SpoolError),
}

/// Downloads one blob into its spool: the network side here, hashing and writing on a
/// blocking thread. Ends the spool verified (and moves the file into the cache) or failed
/// (and removes the file).
async fn download(d: Download) {
    let Download {
        client,
        reference,
        desc,
        blob,
        mut writer,
        slots,
        deadline,
    } = d;
    let _slot = slots.acquire_owned().await;
    let (tx, mut rx) = mpsc::channel::<Chunk>(CHANNEL_CHUNKS);
    let digest = desc.digest.clone();
    let writing = tokio::task::spawn_blocking(move || {
        let mut result = Ok(());
        while let Some(chunk) = rx.blocking_recv() {
            match chunk {
                Chunk::Bytes(b) => {
                    if let Err(e) = writer.write(&b) {
                        result = Err(e);
                        break;
                    }
                }
                Chunk::Failed(why) => {
                    result = Err(writer.fail(why));
                    break;
                }
            }
        }
        result.and_then(|()| writer.finish(&blob))
    });
    let size = u64::try_from(desc.size).unwrap_or(0);
    let network = async {
        // A range from 0 asks for the raw bytes; the writer checks size and digest itself
        // (off the runtime's threads), so oci-client need not hash them a second time.
        let stream = match client
            .pull_blob_stream_partial(&reference, &desc, 0, None)
            .await
        {
            Ok(BlobResponse::Full(s)) | Ok(BlobResponse::Partial(s)) => s,
            Err(e) => return Err(SpoolError::Registry(e.to_string())),
        };
        let mut stream = stream.stream;
        while let Some(item) = stream.next().await {
            let bytes = item.map_err(|e| SpoolError::Registry(e.to_string()))?;
            if tx.send(Chunk::Bytes(bytes)).await.is_err() {
                break; // the writer stopped (too long, or a write error): it knows why
            }
        }
        Ok(())
    };
    let outcome = match tokio::time::timeout(deadline, network).await {
        Ok(r) => r,
        Err(_) => Err(SpoolError::Registry(format!(
            "{} sent no complete blob within {deadline:?}",
            reference.resolve_registry()
        ))),
    };
    if let Err(why) = outcome {
        let _ = tx.send(Chunk::Failed(why)).await;
    }
    drop(tx);
    match writing.await {
        Ok(Ok(())) => info!(%digest, bytes = size, "layer downloaded and verified"),
        Ok(Err(e)) => warn!(%digest, error = %e, "layer download failed"),
        Err(e) => warn!(%digest, error = %e, "layer writer thread failed"),
    }
}

impl LayerFetch {
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    pub fn budget(&self) -> ImageBudget {
        self.budget
    }

    pub fn layer(&self, i: usize) -> &Layer {
        &self.layers[i].layer
    }

    fn error(&self, i: usize, source: LayerFailure) -> ImageError {
        ImageError::Layer {
            reference: self.reference.clone(),
            digest: self.layers[i].layer.digest.clone(),
            source,
        }
    }

    /// Layer `i`'s uncompressed tar, read as it arrives (blocking). `used` is what the
    /// earlier layers already took of the image's byte budget.
    pub fn open(&self, i: usize, used: u64) -> Result<LayerTar, ImageError> {
        let f = &self.layers[i];
        let limit = self.budget.max_unpacked_bytes.saturating_sub(used);
        LayerTar::new(
            f.spool.reader(),
            f.layer.compression,
            &f.layer.diff_id,
            limit,
        )
        .map_err(|e| self.error(i, LayerFailure::Stream(LayerStreamError::Io(e))))
    }

    /// The real cause when a consumer of layer `i` failed: the blob's own failure
    /// (waiting for its download to end) or the image's byte budget. `None` when the
    /// consumer's own error is the cause (e.g. a hostile tar entry).
    pub fn cause(&self, i: usize, tar: &LayerTar) -> Option<ImageError> {
        if let Some(Err(why)) = self.layers[i].spool.wait_for(BLAME_WAIT) {
            return Some(self.error(i, LayerFailure::Blob(why)));
        }
        match tar.classify(std::io::Error::other("")) {
            e @ LayerStreamError::OverBudget { .. } => Some(self.error(i, LayerFailure::Stream(e))),
            _ => None,
        }
    }

    /// Finishes layer `i` after its consumer: reads the rest, checks the diff_id, and
    /// returns the layer's uncompressed size.
    pub fn verify(&self, i: usize, tar: LayerTar) -> Result<u64, ImageError> {
        match tar.verify() {
            Ok(n) => Ok(n),
            Err(e) => {
                if let Some(Err(why)) = self.layers[i].spool.wait_for(BLAME_WAIT) {
                    return Err(self.error(i, LayerFailure::Blob(why)));
                }
                self.evict_if_rotten(i);
                Err(self.error(i, LayerFailure::Stream(e)))
            }
        }
    }

    /// After a cached layer failed to decompress or verify: hashes the cached blob again
    /// and removes it if it no longer matches its digest (it rotted on disk), so the next
    /// pull downloads it afresh. A blob that matches its digest stays: it is what the
    /// digest names, and a config that lies about its diff_id must not evict a layer that
    /// other images share.
    pub fn evict_if_rotten(&self, i: usize) {
        let path = &self.blobs[i];
        let Ok(mut f) = std::fs::File::open(path) else {
            return;
        };
        let mut hasher = Sha256::new();
        if std::io::copy(&mut f, &mut hasher).is_err()
            || format!("sha256:{}", hex::encode(hasher.finalize())) != self.layers[i].layer.digest
        {
            warn!(blob = %path.display(), "cached blob does not match its digest; removed");
            let _ = std::fs::remove_file(path);
        }
    }

    /// Checks the diff_id of every layer downloaded by this fetch (blocking): what a pull
    /// without an unpack does in its one pass.
    pub fn verify_downloaded(&self) -> Result<(), ImageError> {
        let mut used = 0;
        for i in 0..self.layers.len() {
            if self.layers[i].cached {
                continue;
            }
            let tar = self.open(i, used)?;
            used += self.verify(i, tar)?;
        }
        Ok(())
    }

    /// What to report now: a `Downloading` per layer still arriving.
    fn in_progress(&self) -> Vec<Progress> {
        self.layers
            .iter()
            .filter(|f| !f.cached && f.spool.outcome().is_none())
            .map(|f| Progress::Downloading {
                digest: f.layer.digest.clone(),
                done: f.spool.written(),
                total: f.layer.size,
                elapsed: f.started.elapsed(),
            })
            .collect()
    }
}

/// Awaits `work` (the blocking consumer of `fetch`), reporting progress meanwhile: the
/// cached layers at once, each download's bytes about once a second, each verified
/// download when it ends.
pub async fn drive<T>(
    work: tokio::task::JoinHandle<T>,
    fetch: &LayerFetch,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<T, tokio::task::JoinError> {
    progress(Progress::Resolved {
        layers: fetch.layers.len(),
        bytes: fetch.layers.iter().map(|f| f.layer.size).sum(),
    });
    let mut reported = vec![false; fetch.layers.len()];
    let report_ends = |reported: &mut Vec<bool>| {
        for (i, f) in fetch.layers.iter().enumerate() {
            if reported[i] {
                continue;
            }
            if f.cached {
                reported[i] = true;
                progress(Progress::Cached {
                    digest: f.layer.digest.clone(),
                    bytes: f.layer.size,
                });
            } else if let Some(Ok(())) = f.spool.outcome() {
                reported[i] = true;
                progress(Progress::Verified {
                    digest: f.layer.digest.clone(),
                    bytes: f.layer.size,
                    elapsed: f.started.elapsed(),
                });
            }
        }
    };
    report_ends(&mut reported);
    let mut work = work;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await; // the first tick is immediate
    loop {
        tokio::select! {
            done = &mut work => {
                report_ends(&mut reported);
                return done;
            }
            _ = tick.tick() => {
                report_ends(&mut reported);
                for p in fetch.in_progress() {
                    progress(p);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{Compression, ImageConfig, PulledImage, RegistryConfig};

    #[tokio::test]
    async fn tc_u14_deadline_a_trickled_layer_fails_at_its_deadline_naming_the_registry() {
        let head = "HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n";
        let registry = crate::testserver::trickling(head, Duration::from_millis(5));
        let dir = tempfile::tempdir().unwrap();
        let budget = ImageBudget {
            read_timeout: Duration::from_secs(30),
            blob_timeout: Duration::from_millis(500),
            blob_min_rate: u64::MAX,
            ..ImageBudget::default()
        };
        let registries = RegistryConfig {
            insecure: vec![registry.clone()],
            ..Default::default()
        };
        let store = ImageStore::open_with(dir.path(), registries, budget).unwrap();
        let digest = format!("sha256:{}", "ab".repeat(32));
        let layer = Layer {
            digest: digest.clone(),
            diff_id: digest.clone(),
            compression: Compression::Gzip,
            size: 1_000_000,
        };
        let resolved = Resolved {
            image: PulledImage {
                references: vec![],
                digest: digest.clone(),
                config: ImageConfig::default(),
                layers: vec![layer],
            },
            reference: crate::image::parse_reference(&format!("{registry}/test/app:1")).unwrap(),
            descriptors: vec![OciDescriptor {
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                digest,
                size: 1_000_000,
                ..OciDescriptor::default()
            }],
        };
        let start = Instant::now();
        let fetch = store.fetch(&resolved).unwrap();
        let spool = fetch.layers[0].spool.clone();
        let outcome = tokio::task::spawn_blocking(move || spool.wait_for(Duration::from_secs(5)))
            .await
            .unwrap();
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_secs(3),
            "{took:?}"
        );
        match outcome {
            Some(Err(SpoolError::Registry(why))) => {
                assert!(why.contains(&registry) && why.contains("500ms"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }
}

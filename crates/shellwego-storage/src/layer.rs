//! A layer's uncompressed tar stream, checked as it is read: its bytes are hashed for the
//! diff_id and counted against the image's budget while the consumer (the unpacker, or a
//! plain verification) reads them, so decompression happens exactly once.

use std::io::{self, BufReader, Read};

use sha2::{Digest, Sha256};

use crate::image::Compression;

/// Why a layer's uncompressed stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum LayerStreamError {
    #[error("uncompressed layer (diff_id): expected {expected}, got {actual}")]
    DiffId { expected: String, actual: String },
    #[error("the image is larger than its budget of {limit} uncompressed bytes")]
    OverBudget { limit: u64 },
    #[error("reading the layer: {0}")]
    Io(#[source] io::Error),
}

/// Read buffer between the blob and the decompressor.
const READ_BUFFER: usize = 256 << 10;

/// The uncompressed tar of one layer. Read it (e.g. with the unpacker), then call
/// [`LayerTar::verify`]: it reads whatever the consumer left and checks the diff_id.
pub struct LayerTar {
    inner: Box<dyn Read + Send>,
    hasher: Sha256,
    count: u64,
    /// Uncompressed bytes this layer may still produce (the image's remaining budget).
    limit: u64,
    expected: String,
}

impl LayerTar {
    /// Wraps a compressed blob stream. `limit` is the number of uncompressed bytes the
    /// image may still produce.
    pub fn new(
        blob: impl Read + Send + 'static,
        compression: Compression,
        diff_id: &str,
        limit: u64,
    ) -> io::Result<LayerTar> {
        let blob = BufReader::with_capacity(READ_BUFFER, blob);
        let inner: Box<dyn Read + Send> = match compression {
            Compression::None => Box::new(blob),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(blob)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(blob)?),
        };
        Ok(LayerTar {
            inner,
            hasher: Sha256::new(),
            count: 0,
            limit,
            expected: diff_id.to_string(),
        })
    }

    /// Uncompressed bytes read so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Reads the rest of the stream and checks the diff_id; returns the uncompressed size.
    pub fn verify(mut self) -> Result<u64, LayerStreamError> {
        io::copy(&mut self, &mut io::sink()).map_err(|e| self.classify(e))?;
        let actual = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        if actual != self.expected {
            return Err(LayerStreamError::DiffId {
                expected: self.expected,
                actual,
            });
        }
        Ok(self.count)
    }

    /// Turns an I/O error from reading this stream into what it means.
    pub fn classify(&self, e: io::Error) -> LayerStreamError {
        if self.count > self.limit {
            LayerStreamError::OverBudget { limit: self.limit }
        } else {
            LayerStreamError::Io(e)
        }
    }
}

impl Read for LayerTar {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        if self.count > self.limit {
            return Err(io::Error::other(format!(
                "over the image's budget of {} uncompressed bytes",
                self.limit
            )));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn diff_id(bytes: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
    }

    #[test]
    fn verifies_the_diff_id_of_what_was_left_unread() {
        let data = vec![3u8; 100_000];
        let mut tar = LayerTar::new(
            io::Cursor::new(gz(&data)),
            Compression::Gzip,
            &diff_id(&data),
            u64::MAX,
        )
        .unwrap();
        let mut head = [0u8; 10];
        tar.read_exact(&mut head).unwrap();
        assert_eq!(tar.verify().unwrap(), 100_000);

        let tar = LayerTar::new(
            io::Cursor::new(gz(&data)),
            Compression::Gzip,
            &diff_id(b"other"),
            u64::MAX,
        )
        .unwrap();
        assert!(matches!(tar.verify(), Err(LayerStreamError::DiffId { .. })));
    }

    #[test]
    fn a_bomb_stops_at_the_budget() {
        let data = vec![0u8; 5 << 20];
        let tar = LayerTar::new(
            io::Cursor::new(gz(&data)),
            Compression::Gzip,
            &diff_id(&data),
            1 << 20,
        )
        .unwrap();
        assert!(matches!(
            tar.verify(),
            Err(LayerStreamError::OverBudget { limit }) if limit == 1 << 20
        ));
    }
}

//! A layer blob as it arrives: one writer (the download) appends to a file and hashes what
//! it writes; any number of readers follow the file as it grows, on blocking threads, and
//! see its end only once the writer has checked the whole blob against its digest.
//!
//! This is what lets one pass do everything: the registry's bytes are read once, hashed
//! once, written once (the file becomes the cached blob), and decompressed and unpacked
//! by a reader while later layers are still downloading. A reader never sees the end of a
//! blob that is short, too long or has the wrong digest: it gets the failure instead.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use sha2::{Digest, Sha256};

/// Why a blob did not arrive whole and correct. Cloneable: every reader gets a copy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpoolError {
    #[error("the registry ended the blob after {got} of {want} bytes")]
    Short { got: u64, want: u64 },
    #[error("the registry sent more than the {want} bytes the manifest gives")]
    TooLong { want: u64 },
    #[error("its bytes hash to {actual}")]
    Digest { actual: String },
    #[error("registry: {0}")]
    Registry(String),
    #[error("writing the blob: {0}")]
    Io(String),
    #[error("the download was abandoned")]
    Cancelled,
}

#[derive(Debug, Default)]
struct State {
    /// Bytes the writer has flushed to the file: readers may read up to here.
    written: u64,
    /// `Some` once the writer is done: verified, or why not.
    end: Option<Result<(), SpoolError>>,
}

/// One blob, being downloaded or already in the cache.
#[derive(Debug)]
pub struct Spool {
    /// Expected digest (`sha256:...`) and size, from the manifest.
    pub digest: String,
    pub size: u64,
    file: fs::File,
    state: Mutex<State>,
    grew: Condvar,
}

impl Spool {
    /// A blob that is already whole on disk (a cached layer).
    pub fn complete(digest: &str, path: &Path) -> io::Result<Arc<Spool>> {
        let file = fs::File::open(path)?;
        let size = file.metadata()?.len();
        Ok(Arc::new(Spool {
            digest: digest.to_string(),
            size,
            file,
            state: Mutex::new(State {
                written: size,
                end: Some(Ok(())),
            }),
            grew: Condvar::new(),
        }))
    }

    /// A blob about to be written at `path` (created here, empty), and its writer. The
    /// file is removed if the blob fails, and moved into the cache if it is verified.
    pub fn create(digest: &str, size: u64, path: &Path) -> io::Result<(Arc<Spool>, SpoolWriter)> {
        let out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?;
        let file = fs::File::open(path)?;
        let spool = Arc::new(Spool {
            digest: digest.to_string(),
            size,
            file,
            state: Mutex::new(State::default()),
            grew: Condvar::new(),
        });
        let writer = SpoolWriter {
            spool: spool.clone(),
            path: path.to_path_buf(),
            out,
            hasher: Sha256::new(),
            buffer: Vec::with_capacity(WRITE_CHUNK),
            count: 0,
            ended: false,
        };
        Ok((spool, writer))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.state().written
    }

    /// `None` while the download runs; then whether the blob arrived whole and correct.
    pub fn outcome(&self) -> Option<Result<(), SpoolError>> {
        self.state().end.clone()
    }

    /// Waits until the writer is done and returns its outcome.
    pub fn wait(&self) -> Result<(), SpoolError> {
        let mut state = self.state();
        loop {
            if let Some(end) = &state.end {
                return end.clone();
            }
            state = self.grew.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Like `wait`, but gives up after `limit` (`None`: the download still runs).
    pub fn wait_for(&self, limit: std::time::Duration) -> Option<Result<(), SpoolError>> {
        let deadline = std::time::Instant::now() + limit;
        let mut state = self.state();
        loop {
            if let Some(end) = &state.end {
                return Some(end.clone());
            }
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            state = self
                .grew
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// A reader from the first byte, following the file as it grows.
    pub fn reader(self: &Arc<Self>) -> SpoolReader {
        SpoolReader {
            spool: self.clone(),
            pos: 0,
        }
    }

    fn publish(&self, written: u64, end: Option<Result<(), SpoolError>>) {
        let mut state = self.state();
        state.written = written;
        if state.end.is_none() {
            state.end = end;
        }
        drop(state);
        self.grew.notify_all();
    }
}

/// Reads a spool from its start; blocks while the writer is behind.
pub struct SpoolReader {
    spool: Arc<Spool>,
    pos: u64,
}

impl Read for SpoolReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let available = {
            let mut state = self.spool.state();
            loop {
                if state.written > self.pos {
                    break state.written - self.pos;
                }
                match &state.end {
                    Some(Ok(())) => return Ok(0),
                    Some(Err(e)) => return Err(io::Error::other(e.clone())),
                    None => {
                        state = self
                            .spool
                            .grew
                            .wait(state)
                            .unwrap_or_else(|e| e.into_inner())
                    }
                }
            }
        };
        let want = buf
            .len()
            .min(usize::try_from(available).unwrap_or(usize::MAX));
        let n = self.spool.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "blob file is shorter than what was written to it",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// Bytes the writer gathers before one `write` to the file (and one wake-up of readers).
const WRITE_CHUNK: usize = 256 << 10;

/// The one writer of a spool. Dropping it without `finish` ends the spool as cancelled.
pub struct SpoolWriter {
    spool: Arc<Spool>,
    path: PathBuf,
    out: fs::File,
    hasher: Sha256,
    buffer: Vec<u8>,
    count: u64,
    ended: bool,
}

impl SpoolWriter {
    /// Appends bytes; refuses more than the manifest's size.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        self.count += bytes.len() as u64;
        if self.count > self.spool.size {
            return Err(self.fail(SpoolError::TooLong {
                want: self.spool.size,
            }));
        }
        self.hasher.update(bytes);
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= WRITE_CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SpoolError> {
        if let Err(e) = self.out.write_all(&self.buffer) {
            return Err(self.fail(SpoolError::Io(e.to_string())));
        }
        self.buffer.clear();
        let written = self.count;
        self.spool.publish(written, None);
        Ok(())
    }

    /// Ends the spool as failed (also for a failure found outside, e.g. the registry's).
    pub fn fail(&mut self, why: SpoolError) -> SpoolError {
        if !self.ended {
            self.ended = true;
            let _ = fs::remove_file(&self.path);
            let written = self.spool.written();
            self.spool.publish(written, Some(Err(why.clone())));
        }
        why
    }

    /// Checks size and digest, makes the file durable, moves it to `dest` (the cache;
    /// readers keep their handle) and only then ends the spool as verified, so a reader
    /// that finds the blob wrong in another way can remove it from the cache for good.
    pub fn finish(mut self, dest: &Path) -> Result<(), SpoolError> {
        self.flush()?;
        if self.count != self.spool.size {
            let why = SpoolError::Short {
                got: self.count,
                want: self.spool.size,
            };
            return Err(self.fail(why));
        }
        let actual = format!(
            "sha256:{}",
            hex::encode(std::mem::take(&mut self.hasher).finalize())
        );
        if actual != self.spool.digest {
            return Err(self.fail(SpoolError::Digest { actual }));
        }
        if let Err(e) = self.out.sync_data() {
            return Err(self.fail(SpoolError::Io(e.to_string())));
        }
        if let Err(e) = fs::rename(&self.path, dest) {
            tracing::warn!(blob = %dest.display(), error = %e, "could not move a verified blob into the cache");
            let _ = fs::remove_file(&self.path);
        }
        self.ended = true;
        self.spool.publish(self.count, Some(Ok(())));
        Ok(())
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        self.fail(SpoolError::Cancelled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(bytes: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
    }

    #[test]
    fn a_reader_follows_the_writer_and_sees_the_end_only_when_verified() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let (spool, mut writer) =
            Spool::create(&digest(&data), data.len() as u64, &dir.path().join("b")).unwrap();
        let mut reader = spool.reader();
        let reading = std::thread::spawn(move || {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).map(|_| got)
        });
        for chunk in data.chunks(10_000) {
            writer.write(chunk).unwrap();
        }
        let cached = dir.path().join("cached");
        writer.finish(&cached).unwrap();
        assert_eq!(reading.join().unwrap().unwrap(), data);
        assert_eq!(spool.outcome(), Some(Ok(())));
        assert_eq!(std::fs::read(&cached).unwrap(), data);
        assert!(!dir.path().join("b").exists());
    }

    #[test]
    fn wrong_digest_short_and_long_blobs_fail_their_readers() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![7u8; 1000];
        type Expect = fn(&SpoolError) -> bool;
        let cases: Vec<(Vec<u8>, String, Expect)> = vec![
            (data.clone(), digest(b"other"), |e| {
                matches!(e, SpoolError::Digest { .. })
            }),
            (data[..500].to_vec(), digest(&data), |e| {
                matches!(
                    e,
                    SpoolError::Short {
                        got: 500,
                        want: 1000
                    }
                )
            }),
            ([data.clone(), vec![1]].concat(), digest(&data), |e| {
                matches!(e, SpoolError::TooLong { want: 1000 })
            }),
        ];
        for (i, (sent, want_digest, is_expected)) in cases.into_iter().enumerate() {
            let (spool, mut writer) =
                Spool::create(&want_digest, 1000, &dir.path().join(i.to_string())).unwrap();
            let mut reader = spool.reader();
            let dest = dir.path().join(format!("cached-{i}"));
            let result = writer.write(&sent).and_then(|()| writer.finish(&dest));
            let err = result.unwrap_err();
            assert!(is_expected(&err), "case {i}: {err}");
            assert!(!dest.exists() && !dir.path().join(i.to_string()).exists());
            let mut sink = Vec::new();
            assert!(reader.read_to_end(&mut sink).is_err(), "case {i}");
        }
    }

    #[test]
    fn a_dropped_writer_cancels() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, writer) = Spool::create(&digest(b"x"), 1, &dir.path().join("b")).unwrap();
        drop(writer);
        assert_eq!(spool.wait(), Err(SpoolError::Cancelled));
    }
}

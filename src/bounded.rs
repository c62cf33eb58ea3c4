//! Readers that bound what untrusted input may produce. [`LimitReader`] counts the bytes that come
//! out of a stream (a decompressor, an HTTP body) and fails once there are more than allowed, so
//! a decompression bomb or an endless answer stops at the limit instead of filling the disk or
//! memory. It composes like any other `Read`: `LimitReader::new(decompressor(file), limit)`.

use std::io::{self, Read};

/// The error a [`LimitReader`] returns (inside an `io::Error` of kind `InvalidData`) when its
/// stream goes past the limit. Callers usually check [`LimitReader::exceeded`] and report their
/// own error, which names what was being read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("more than {limit} bytes")]
pub struct LimitExceeded {
    pub limit: u64,
}

/// A reader that yields at most `limit` bytes of `inner` and fails (instead of stopping quietly,
/// as `Read::take` does) when `inner` has more.
pub struct LimitReader<R> {
    inner: R,
    limit: u64,
    count: u64,
    exceeded: bool,
}

impl<R: Read> LimitReader<R> {
    pub fn new(inner: R, limit: u64) -> Self {
        LimitReader {
            inner,
            limit,
            count: 0,
            exceeded: false,
        }
    }

    /// Bytes passed on so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// True once the stream went past the limit (every later read fails).
    pub fn exceeded(&self) -> bool {
        self.exceeded
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    fn error(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            LimitExceeded { limit: self.limit },
        )
    }
}

impl<R: Read> Read for LimitReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.exceeded {
            return Err(self.error());
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let left = self.limit - self.count;
        if left == 0 {
            // At the limit: the stream must end here. One byte more is one too many.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => {
                    self.exceeded = true;
                    Err(self.error())
                }
            };
        }
        let want = (buf.len() as u64).min(left) as usize;
        let n = self.inner.read(&mut buf[..want])?;
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_up_to_the_limit_and_fails_past_it() {
        // (input length, limit, whether reading all of it succeeds)
        for (len, limit, ok) in [
            (0usize, 0u64, true),
            (10, 10, true),
            (10, 11, true),
            (11, 10, false),
            (1 << 20, 4096, false),
        ] {
            let data = vec![7u8; len];
            let mut r = LimitReader::new(&data[..], limit);
            let mut out = Vec::new();
            let result = r.read_to_end(&mut out);
            assert_eq!(result.is_ok(), ok, "len {len} limit {limit}");
            assert_eq!(r.exceeded(), !ok);
            assert!(out.len() as u64 <= limit);
            if let Err(e) = result {
                assert_eq!(e.kind(), io::ErrorKind::InvalidData);
                let inner = e.get_ref().and_then(|i| i.downcast_ref::<LimitExceeded>());
                assert_eq!(inner, Some(&LimitExceeded { limit }));
                // It stays failed.
                assert!(r.read(&mut [0u8; 8]).is_err());
            }
        }
    }

    #[test]
    fn counts_what_comes_out_of_a_decompressor() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&vec![0u8; 8 << 20]).unwrap();
        let small = gz.finish().unwrap();
        assert!(small.len() < 64 << 10, "{}", small.len());
        let mut r = LimitReader::new(flate2::read::GzDecoder::new(&small[..]), 1 << 20);
        let err = io::copy(&mut r, &mut io::sink()).unwrap_err();
        assert!(err.to_string().contains("more than 1048576 bytes"), "{err}");
        assert_eq!(r.count(), 1 << 20);
    }
}

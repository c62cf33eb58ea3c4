//! Reading a stream on a second thread: the producer (a decompressor, say) fills buffers while the
//! consumer (a tar reader hashing and storing files) works on the ones before, so the two costs
//! overlap instead of adding up. A kernel package is ~1 s of xz and ~0.5 s of hashing and writing.

use std::io::{self, Read};
use std::sync::mpsc::{Receiver, sync_channel};

/// Bytes in one buffer handed from the producer to the consumer.
const CHUNK: usize = 1 << 20;
/// Buffers the producer may run ahead of the consumer (memory: `AHEAD * CHUNK`).
const AHEAD: usize = 4;

/// Run `consume` over the stream `open` makes, with `open` and every read of its stream on a
/// scoped thread. The producer stops at end of stream, at its first error (which `consume` reads
/// as that error), or as soon as `consume` returns, at most `AHEAD` buffers past what was read.
pub fn read_ahead<'a, T>(
    open: impl FnOnce() -> io::Result<Box<dyn Read + 'a>> + Send + 'a,
    consume: impl FnOnce(&mut dyn Read) -> T,
) -> T {
    std::thread::scope(|scope| {
        let (tx, rx) = sync_channel::<io::Result<Vec<u8>>>(AHEAD);
        scope.spawn(move || {
            let mut stream = match open() {
                Ok(stream) => stream,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            loop {
                match fill(&mut stream) {
                    Ok(buf) if buf.is_empty() => return,
                    Ok(buf) => {
                        if tx.send(Ok(buf)).is_err() {
                            return; // the consumer is done
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            }
        });
        let mut reader = ChannelReader {
            rx,
            buf: Vec::new(),
            pos: 0,
        };
        let out = consume(&mut reader);
        // Dropping the receiver makes the producer's next send fail, so the scope's join is short.
        drop(reader);
        out
    })
}

/// Read up to one chunk (less only at the end of the stream).
fn fill(stream: &mut dyn Read) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; CHUNK];
    let mut len = 0;
    while len < CHUNK {
        match stream.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    Ok(buf)
}

/// The consumer's side: the producer's buffers in order; end of stream when it has stopped.
struct ChannelReader {
    rx: Receiver<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(Ok(buf)) => {
                    self.buf = buf;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_every_byte_in_order() {
        let data: Vec<u8> = (0..(3 * CHUNK + 12345)).map(|i| (i % 251) as u8).collect();
        let src = data.clone();
        let got = read_ahead(
            move || Ok(Box::new(io::Cursor::new(src)) as Box<dyn Read>),
            |r| {
                let mut v = Vec::new();
                r.read_to_end(&mut v).map(|_| v)
            },
        )
        .unwrap();
        assert_eq!(got, data);
    }

    #[test]
    fn the_producers_error_reaches_the_consumer() {
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("broken stream"));
                }
                let n = buf.len().min(self.0);
                self.0 -= n;
                Ok(n)
            }
        }
        let err = read_ahead(
            || Ok(Box::new(Failing(10)) as Box<dyn Read>),
            |r| r.read_to_end(&mut Vec::new()),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "broken stream");
        let err = read_ahead(
            || Err(io::Error::other("cannot open")),
            |r| r.read_to_end(&mut Vec::new()),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "cannot open");
    }

    #[test]
    fn a_consumer_that_stops_early_does_not_wait_for_the_whole_stream() {
        // An endless producer: the scope must still end once the consumer returns.
        let first = read_ahead(
            || Ok(Box::new(io::repeat(7)) as Box<dyn Read>),
            |r| {
                let mut b = [0u8; 4];
                r.read_exact(&mut b).map(|_| b)
            },
        )
        .unwrap();
        assert_eq!(first, [7; 4]);
    }
}

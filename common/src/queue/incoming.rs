//! A message being received: its queue file, written as it streams in, and the count of its
//! `Received:` headers (the hop count, RFC 5321 §6.3).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::{Envelope, Queue, QueueId, StoreError};
use tokio::io::{AsyncWrite, AsyncWriteExt as _, BufWriter};

/// Bytes buffered before a write to the file.
const WRITE_BUF: usize = 64 * 1024;

/// The queue file of a message being received. It is an [`AsyncWrite`] sink for DATA and
/// BDAT; what passes through it is the client's message, whose header section is scanned for
/// `Received:` lines.
pub struct Incoming {
    id: QueueId,
    file: BufWriter<tokio::fs::File>,
    hops: HopCounter,
    /// Bytes of the client's message so far.
    body_size: u64,
    /// Bytes written to the file (our header included).
    size: u64,
    /// The start of the client's message, for its `Message-ID`.
    head: Vec<u8>,
}

/// Bytes of the client's message kept to find its `Message-ID`.
const HEAD_KEPT: usize = 16 * 1024;

impl Incoming {
    /// Creates the message file of a new queue entry.
    pub async fn create(queue: &Queue) -> Result<Self, StoreError> {
        let q = queue.clone();
        let (id, file) = blocking(move || q.create()).await?;
        Ok(Self {
            id,
            file: BufWriter::with_capacity(WRITE_BUF, tokio::fs::File::from_std(file)),
            hops: HopCounter::default(),
            body_size: 0,
            size: 0,
            head: Vec::new(),
        })
    }

    /// The id of the entry-to-be.
    pub fn id(&self) -> &QueueId {
        &self.id
    }

    /// Writes our own header (not counted as a hop of the client's message).
    pub async fn write_header(&mut self, header: &str) -> io::Result<()> {
        self.file.write_all(header.as_bytes()).await?;
        self.size += header.len() as u64;
        Ok(())
    }

    /// The client's message's `Message-ID` (when it is in its first 16 KiB).
    pub fn message_id(&self) -> Option<String> {
        crate::obs::message_id(&self.head)
    }

    /// `Received:` headers in the client's message.
    pub fn hops(&self) -> usize {
        self.hops.count
    }

    /// Bytes of the client's message so far (for BDAT's running total).
    pub fn body_size(&self) -> u64 {
        self.body_size
    }

    /// Bytes in the file.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Makes the entry durable (see [`Queue::commit`]).
    pub async fn commit(mut self, queue: &Queue, envelope: Envelope) -> Result<(), StoreError> {
        if let Err(e) = self.file.flush().await {
            self.discard(queue).await;
            return Err(StoreError::Io {
                path: queue.dir().to_owned(),
                source: e,
            });
        }
        let file = self.file.into_inner().into_std().await;
        let q = queue.clone();
        let started = tokio::time::Instant::now();
        let r = blocking(move || q.commit(file, &envelope)).await;
        crate::obs::fsync_latency("queue", started.elapsed().as_secs_f64());
        r
    }

    /// Removes the file of a message that will not be queued.
    pub async fn discard(self, queue: &Queue) {
        drop(self.file);
        let q = queue.clone();
        let id = self.id;
        let _ = tokio::task::spawn_blocking(move || q.discard(&id)).await;
    }
}

impl AsyncWrite for Incoming {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.file).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            let written = buf.get(..n).unwrap_or_default();
            this.hops.feed(written);
            if this.head.len() < HEAD_KEPT {
                let room = HEAD_KEPT - this.head.len();
                this.head
                    .extend_from_slice(written.get(..room.min(n)).unwrap_or_default());
            }
            this.body_size += n as u64;
            this.size += n as u64;
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

/// Runs blocking queue work off the async workers.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(StoreError::Io {
            path: std::path::PathBuf::new(),
            source: io::Error::other(e),
        })
    })
}

/// Counts header lines that start with `Received:` in a stream, in any chunking, up to the
/// empty line that ends the header section. Holds nine bytes, whatever the input.
#[derive(Debug, Default)]
pub(crate) struct HopCounter {
    count: usize,
    prefix: [u8; 9],
    prefix_len: usize,
    /// Not at the start of the message, and not right after a line break.
    in_line: bool,
    body: bool,
}

impl HopCounter {
    const NAME: &'static [u8; 9] = b"received:";

    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.body {
                return;
            }
            if b == b'\n' {
                self.in_line = false;
                self.prefix_len = 0;
                continue;
            }
            if !self.in_line && b == b'\r' {
                // An empty line (the DATA decoder makes every line end in CRLF).
                self.body = true;
                return;
            }
            self.in_line = true;
            if self.prefix_len < Self::NAME.len() {
                if let Some(slot) = self.prefix.get_mut(self.prefix_len) {
                    *slot = b.to_ascii_lowercase();
                }
                self.prefix_len += 1;
                if self.prefix_len == Self::NAME.len() && &self.prefix == Self::NAME {
                    self.count += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_received_headers_in_any_chunking() {
        let msg = b"Received: a\r\n\tb\r\nRECEIVED: c\r\nX-Received: d\r\nSubject: Received: e\r\n\r\nReceived: body\r\n";
        for chunk in [1, 2, 3, 7, 64, msg.len()] {
            let mut h = HopCounter::default();
            for piece in msg.chunks(chunk) {
                h.feed(piece);
            }
            assert_eq!(h.count, 2, "chunks of {chunk}");
        }
    }
}

//! `DripIo`: the connection wrapper behind the `header_drip` scenario.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// Most bytes dripped for one response: past this the head is not coming to an end anyway.
const MAX_DRIP: usize = 64 * 1024;

/// A TCP stream that, while `drip` holds a non-zero interval in milliseconds, writes one
/// byte per interval, until the end of a response head (`\r\n\r\n`) has been written;
/// then it clears `drip` and writes normally. One relaxed atomic load per write otherwise.
pub(crate) struct DripIo {
    inner: TcpStream,
    drip: Arc<AtomicU64>,
    sleep: Option<Pin<Box<Sleep>>>,
    /// The last four bytes written while dripping.
    tail: [u8; 4],
    dripped: usize,
}

impl DripIo {
    pub(crate) fn new(inner: TcpStream, drip: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            drip,
            sleep: None,
            tail: [0; 4],
            dripped: 0,
        }
    }

    fn poll_drip(&mut self, cx: &mut Context<'_>, ms: u64, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Some(sleep) = self.sleep.as_mut() {
            ready!(sleep.as_mut().poll(cx));
            self.sleep = None;
        }
        let Some(&b) = buf.first() else {
            return Poll::Ready(Ok(0));
        };
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &[b]))?;
        if n == 1 {
            self.tail = [self.tail[1], self.tail[2], self.tail[3], b];
            self.dripped += 1;
            if &self.tail == b"\r\n\r\n" || self.dripped >= MAX_DRIP {
                self.drip.store(0, Ordering::Relaxed);
                self.tail = [0; 4];
                self.dripped = 0;
            } else {
                self.sleep = Some(Box::pin(tokio::time::sleep(Duration::from_millis(ms))));
            }
        }
        Poll::Ready(Ok(n))
    }
}

impl AsyncRead for DripIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for DripIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.drip.load(Ordering::Relaxed) {
            0 => Pin::new(&mut self.inner).poll_write(cx, buf),
            ms => self.poll_drip(cx, ms, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.drip.load(Ordering::Relaxed) {
            0 => Pin::new(&mut self.inner).poll_write_vectored(cx, bufs),
            ms => {
                let first = bufs
                    .iter()
                    .find(|b| !b.is_empty())
                    .map_or(&[][..], |b| &b[..]);
                self.poll_drip(cx, ms, first)
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

//! A child's output pipe read without its wake-ups while it is being let
//! fill: the descriptor is in the reactor's epoll set only while a read
//! waits for data, not while the reader sleeps on purpose.
//!
//! Why: tokio registers a pipe edge-triggered for as long as it lives, and
//! Linux wakes an epoll waiter on every write to a pipe, readable or not.
//! The stdout reader of a provider run sleeps up to `BATCH_INTERVAL`
//! (50 us) between batches so that the pipe fills, and a CLI that writes a
//! line per `write(2)` then woke the reader's thread once per line while it
//! slept: in `chat-one`, about 10 `epoll_wait` returns per batch of 15
//! lines and 0.65 voluntary context switches per event on that thread, 4
//! to 7 us of gateway CPU per event instead of about 1.3. Here a read tries
//! the descriptor first and registers it only when it would block;
//! [`QuietPipe::quiet`] takes it out again before such a sleep.

use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, Interest, ReadBuf};

/// A non-blocking pipe (or any readable descriptor), read as [`AsyncRead`].
pub struct QuietPipe {
    state: State,
}

enum State {
    /// Not in the epoll set: read directly; nothing wakes us for it.
    Quiet(OwnedFd),
    /// In the epoll set, because the last read would have blocked.
    Waiting(AsyncFd<OwnedFd>),
    /// Registering failed; the error was returned and the descriptor closed.
    Broken,
}

impl QuietPipe {
    /// Takes `fd` (made non-blocking here); it is not registered yet.
    pub fn new(fd: OwnedFd) -> io::Result<QuietPipe> {
        rustix::io::ioctl_fionbio(&fd, true)?;
        Ok(QuietPipe {
            state: State::Quiet(fd),
        })
    }

    /// Takes the descriptor out of the epoll set (if a read had put it
    /// there), so writes to the pipe wake nobody until the next read.
    pub fn quiet(&mut self) {
        if matches!(self.state, State::Waiting(_)) {
            if let State::Waiting(fd) = std::mem::replace(&mut self.state, State::Broken) {
                self.state = State::Quiet(fd.into_inner());
            }
        }
    }

    /// In the epoll set (a read is or was waiting since the last `quiet`).
    pub fn is_registered(&self) -> bool {
        matches!(self.state, State::Waiting(_))
    }
}

/// One `read(2)` into `buf`'s unfilled part.
fn read_into(fd: &OwnedFd, buf: &mut ReadBuf<'_>) -> io::Result<()> {
    let n = rustix::io::read(fd, buf.initialize_unfilled())?;
    buf.advance(n);
    Ok(())
}

impl AsyncRead for QuietPipe {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Quiet(fd) => match read_into(fd, buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        let State::Quiet(fd) = std::mem::replace(&mut this.state, State::Broken)
                        else {
                            unreachable!()
                        };
                        // SAFETY: `fd` is an OwnedFd moved into the AsyncFd: it stays
                        // open and the same pipe until `into_inner` or drop.
                        match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
                            Ok(fd) => this.state = State::Waiting(fd),
                            Err(e) => return Poll::Ready(Err(e.into_parts().1)),
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    done => return Poll::Ready(done),
                },
                State::Waiting(fd) => {
                    let mut guard = ready!(fd.poll_read_ready(cx))?;
                    match guard.try_io(|fd| read_into(fd.get_ref(), buf)) {
                        Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                        Ok(done) => return Poll::Ready(done),
                        // Not readable after all: readiness was cleared; wait again.
                        Err(_would_block) => {}
                    }
                }
                State::Broken => {
                    return Poll::Ready(Err(io::Error::other("pipe registration failed")))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::io::Write;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

    /// A socket pair reads as a pipe does (a pipe needs a rustix feature
    /// or `unsafe` here; the reader does not care which it gets).
    fn pipe() -> (QuietPipe, std::os::unix::net::UnixStream) {
        let (r, w) = std::os::unix::net::UnixStream::pair().unwrap();
        (QuietPipe::new(OwnedFd::from(r)).unwrap(), w)
    }

    /// Reads what is there without registering, waits (registered) for
    /// what comes later, reads again after `quiet`, and sees the end.
    #[tokio::test]
    async fn reads_waits_quiets_and_ends() {
        let (pipe, mut w) = pipe();
        let mut reader = BufReader::new(pipe);
        w.write_all(b"first\n").unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        assert_eq!(line, "first\n");
        assert!(!reader.get_ref().is_registered(), "data was there: no wait");

        // One poll of a read with nothing there: it waits, registered.
        line.clear();
        {
            let read = reader.read_line(&mut line);
            tokio::pin!(read);
            let first = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
            assert!(first.is_pending(), "nothing was written yet");
        }
        assert!(reader.get_ref().is_registered(), "it waits for a write");
        w.write_all(b"second\n").unwrap();
        reader.read_line(&mut line).await.unwrap();
        assert_eq!(line, "second\n");
        assert!(reader.get_ref().is_registered());

        reader.get_mut().quiet();
        assert!(!reader.get_ref().is_registered());
        w.write_all(b"third\nrest").unwrap();
        drop(w);
        let mut rest = String::new();
        reader.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "third\nrest");
    }
}

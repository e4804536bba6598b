//! A minimal blocking WebSocket client (RFC 6455) for one reader on its own
//! thread: `chat-one`'s reader, so that the client's cost per event is close
//! to the pipe baseline's reader (one 64 KiB read, then a scan per message)
//! and is not charged to the gateway. The awc reader the other scenarios use
//! costs about as much CPU per event as the gateway itself (a task wake-up,
//! a `Bytes` and a codec step per frame) on the same two cores.
//!
//! It speaks what the gateway sends: unmasked, unfragmented server frames.
//! Pings are answered; anything else unexpected is an error, never a guess.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Initial read buffer; grows for a message larger than it.
const READ_BUFFER: usize = 64 * 1024;
/// Largest message accepted (as the awc reader's limit).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

pub struct RawWs {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Unparsed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
}

/// What one read yields. `Text` borrows the reader's buffer.
pub enum RawIn<'a> {
    Text(&'a [u8]),
    Binary,
    Close(Option<u16>),
    Ended,
}

impl RawWs {
    /// Opens `url` (`ws://host:port/path?query`) and completes the handshake.
    pub fn connect(url: &str) -> Result<RawWs, String> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| format!("not a ws:// url: {url}"))?;
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let stream = TcpStream::connect(host).map_err(|e| format!("connect {host}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut ws = RawWs {
            stream,
            buf: vec![0; READ_BUFFER],
            start: 0,
            end: 0,
        };
        let path = if path.is_empty() { "/" } else { path };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        ws.stream
            .write_all(request.as_bytes())
            .map_err(|e| format!("handshake: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let head_end = loop {
            if let Some(i) = ws.buf[..ws.end].windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if ws.end == ws.buf.len() {
                return Err("handshake: response headers too long".into());
            }
            if ws.fill(deadline)? == 0 {
                return Err("handshake: connection closed".into());
            }
        };
        let head = String::from_utf8_lossy(&ws.buf[..head_end]).into_owned();
        if !head.starts_with("HTTP/1.1 101") {
            let status = head.lines().next().unwrap_or("");
            return Err(format!("handshake refused: {status}"));
        }
        ws.start = head_end;
        Ok(ws)
    }

    /// Sends one text message (masked, as a client must).
    pub fn send_text(&mut self, text: &str) -> Result<(), String> {
        self.send(0x1, text.as_bytes())
    }

    fn send(&mut self, opcode: u8, payload: &[u8]) -> Result<(), String> {
        let mut frame = Vec::with_capacity(payload.len() + 14);
        frame.push(0x80 | opcode);
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= u16::MAX as usize => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = *b"mask";
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream
            .write_all(&frame)
            .map_err(|e| format!("send: {e}"))
    }

    /// Reads more bytes into the buffer (compacting or growing it first);
    /// 0 at the end of the stream.
    fn fill(&mut self, deadline: Instant) -> Result<usize, String> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("timed out waiting for a frame".into());
        }
        self.stream
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match self.read_more() {
            Ok(n) => Ok(n),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err("timed out waiting for a frame".into())
            }
            Err(e) => Err(format!("read: {e}")),
        }
    }

    /// One read(2) into the buffer's free end (compacting or growing it first).
    fn read_more(&mut self) -> std::io::Result<usize> {
        if self.start > 0 && self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            let len = self.buf.len() * 2;
            self.buf.resize(len, 0);
        }
        let n = self.stream.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// For a reader that waits on many sockets itself (epoll): reads never
    /// block, and [`RawWs::try_next`] says when the socket has nothing more.
    pub fn set_nonblocking(&self, on: bool) -> Result<(), String> {
        self.stream.set_nonblocking(on).map_err(|e| e.to_string())
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.stream)
    }

    /// [`RawWs::next`] on a nonblocking socket: `None` when a whole message
    /// has not arrived yet (the socket had nothing more to read).
    pub fn try_next(&mut self) -> Result<Option<RawIn<'_>>, String> {
        loop {
            match self.parse()? {
                Some((opcode, from, to)) => match opcode {
                    0x1 => return Ok(Some(RawIn::Text(&self.buf[from..to]))),
                    0x2 => return Ok(Some(RawIn::Binary)),
                    0x8 => {
                        let p = &self.buf[from..to];
                        let code = (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
                        return Ok(Some(RawIn::Close(code)));
                    }
                    0x9 => {
                        // Two heartbeats' pongs at most wait in an empty
                        // send buffer: this write does not find it full.
                        let payload = self.buf[from..to].to_vec();
                        self.send(0xA, &payload)?;
                    }
                    0xA => {}
                    op => return Err(format!("unexpected opcode {op:#x}")),
                },
                None => match self.read_more() {
                    Ok(0) => return Ok(Some(RawIn::Ended)),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("read: {e}")),
                },
            }
        }
    }

    /// The next data message or close, answering pings; `Err` after `deadline`.
    pub fn next(&mut self, deadline: Instant) -> Result<RawIn<'_>, String> {
        loop {
            match self.parse()? {
                Some((opcode, from, to)) => match opcode {
                    0x1 => return Ok(RawIn::Text(&self.buf[from..to])),
                    0x2 => return Ok(RawIn::Binary),
                    0x8 => {
                        let p = &self.buf[from..to];
                        let code = (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
                        return Ok(RawIn::Close(code));
                    }
                    0x9 => {
                        let payload = self.buf[from..to].to_vec();
                        self.send(0xA, &payload)?;
                    }
                    0xA => {}
                    op => return Err(format!("unexpected opcode {op:#x}")),
                },
                None => {
                    if self.fill(deadline)? == 0 {
                        return Ok(RawIn::Ended);
                    }
                }
            }
        }
    }

    /// One complete frame at the front of the buffer: (opcode, payload
    /// range), consumed; `None` when more bytes are needed.
    fn parse(&mut self) -> Result<Option<(u8, usize, usize)>, String> {
        let b = &self.buf[self.start..self.end];
        if b.len() < 2 {
            return Ok(None);
        }
        if b[0] & 0x80 == 0 || b[0] & 0x0f == 0 {
            return Err("fragmented message (the raw reader takes whole frames)".into());
        }
        if b[1] & 0x80 != 0 {
            return Err("masked server frame".into());
        }
        let (len, head) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&b[2..10]);
                (u64::from_be_bytes(n) as usize, 10)
            }
            126 | 127 => return Ok(None),
            n => (n as usize, 2),
        };
        if len > MAX_MESSAGE {
            return Err(format!("message of {len} bytes over the reader's limit"));
        }
        if b.len() < head + len {
            // Make room for the whole frame before the next read.
            if head + len > self.buf.len() - self.start {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                if head + len > self.buf.len() {
                    self.buf.resize((head + len).next_power_of_two(), 0);
                }
            }
            return Ok(None);
        }
        let opcode = b[0] & 0x0f;
        let from = self.start + head;
        self.start = from + len;
        if self.start == self.end {
            // Empty: the next read starts at 0 (the payload stays valid
            // until then, which its borrow outlives at most).
            self.start = 0;
            self.end = 0;
        }
        Ok(Some((opcode, from, from + len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => f.push(n as u8),
            n if n <= u16::MAX as usize => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    /// Frames of every length form, written in odd-sized pieces right after
    /// the handshake response, come out whole and in order; a ping is
    /// answered with a masked pong of the same payload.
    #[test]
    fn reads_frames_split_across_reads() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let big = vec![b'x'; 200_000];
        let mid = vec![b'y'; 1_000];
        let (b2, m2) = (big.clone(), mid.clone());
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            let mut byte = [0u8; 1];
            while !req.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut byte).unwrap();
                req.push(byte[0]);
            }
            let mut out =
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n".to_vec();
            out.extend(server_frame(0x1, b"small"));
            out.extend(server_frame(0x9, b"hb"));
            out.extend(server_frame(0x1, &m2));
            out.extend(server_frame(0x1, &b2));
            out.extend(server_frame(0x8, &4008u16.to_be_bytes()));
            for piece in out.chunks(7_777) {
                s.write_all(piece).unwrap();
            }
            // The pong: 2 header bytes, 4 mask bytes, 2 masked payload bytes.
            let mut pong = [0u8; 8];
            s.read_exact(&mut pong).unwrap();
            (String::from_utf8_lossy(&req).into_owned(), pong)
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut ws = RawWs::connect(&format!("ws://{addr}/ws?token=t")).unwrap();
        let mut texts = Vec::new();
        let code = loop {
            match ws.next(deadline).unwrap() {
                RawIn::Text(t) => texts.push(t.to_vec()),
                RawIn::Close(code) => break code,
                RawIn::Binary | RawIn::Ended => panic!("unexpected"),
            }
        };
        assert_eq!(texts, vec![b"small".to_vec(), mid, big]);
        assert_eq!(code, Some(4008));
        let (req, pong) = server.join().unwrap();
        assert!(req.starts_with("GET /ws?token=t HTTP/1.1\r\n"), "{req}");
        assert_eq!(pong[0], 0x8A);
        assert_eq!(pong[1], 0x80 | 2);
        let mask = &pong[2..6];
        assert_eq!([pong[6] ^ mask[0], pong[7] ^ mask[1]], *b"hb");
    }
}

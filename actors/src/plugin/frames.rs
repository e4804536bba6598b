//! WebSocket frame scanning for the plugin relay (RFC 6455 section 5).
//!
//! [`Scanner`] finds frame boundaries in the raw bytes of one direction and
//! checks what a receiver must check before the frame is passed on: reserved
//! bits (no extension is negotiated on either leg), opcodes, masking, the
//! control frame rules, the order of fragments, the frame size limit, close
//! payloads, and UTF-8 of text messages, across fragments and within a frame
//! that is still arriving (so invalid text fails as soon as the bad byte is
//! in, not when the frame or message is complete). Data frames are not
//! copied or re-encoded: the relay forwards their bytes as they came.

/// Opcodes.
pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Close codes the scanner fails a connection with.
pub const CLOSE_PROTOCOL: u16 = 1002;
pub const CLOSE_INVALID_PAYLOAD: u16 = 1007;
pub const CLOSE_TOO_BIG: u16 = 1009;

/// Largest control frame payload.
const MAX_CONTROL: usize = 125;

/// Which end wrote the bytes: a client must mask every frame, a server never.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sender {
    Client,
    Server,
}

/// Why the connection must be failed, and the close code that says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Violation {
    pub code: u16,
    pub reason: &'static str,
}

impl Violation {
    const fn protocol(reason: &'static str) -> Violation {
        Violation {
            code: CLOSE_PROTOCOL,
            reason,
        }
    }
}

const INVALID_UTF8: Violation = Violation {
    code: CLOSE_INVALID_PAYLOAD,
    reason: "Invalid UTF-8",
};

/// A control frame's meaning (its payload unmasked).
#[derive(Debug, PartialEq, Eq)]
pub enum Control {
    Ping(Vec<u8>),
    Pong,
    /// `None`: a close frame without a status code.
    Close(Option<(u16, String)>),
}

/// What the head of a buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// A whole data frame of this many bytes, valid: relay it as it is.
    Data(usize),
    /// A whole control frame of `len` bytes.
    Control { len: usize, control: Control },
    /// The buffer ends inside a frame; what has arrived of it is valid.
    Partial,
    /// Fail the connection.
    Fail(Violation),
}

/// Frame state of one direction of one connection.
#[derive(Debug)]
pub struct Scanner {
    sender: Sender,
    max_payload: usize,
    /// A fragmented data message is in progress: whether it is text.
    message: Option<bool>,
    utf8: Utf8,
    /// Payload bytes of the (partial) frame at the buffer's head already checked.
    checked: usize,
}

struct Header {
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    header_len: usize,
    payload_len: usize,
}

impl Scanner {
    pub fn new(sender: Sender, max_payload: usize) -> Scanner {
        Scanner {
            sender,
            max_payload,
            message: None,
            utf8: Utf8::default(),
            checked: 0,
        }
    }

    /// Looks at the frame at the start of `buf`. Call again with the same
    /// head (plus more bytes) after `Partial`, and with the bytes after the
    /// frame after `Data` or `Control`. Nothing is valid after `Fail`.
    pub fn next(&mut self, buf: &[u8]) -> Next {
        match self.small_message(buf) {
            Some(len) => Next::Data(len),
            None => self.check(buf),
        }
    }

    /// [`Scanner::next`] with every check spelled out, for any frame.
    fn check(&mut self, buf: &[u8]) -> Next {
        let h = match header(buf, self.max_payload) {
            Ok(Some(h)) => h,
            Ok(None) => return Next::Partial,
            Err(v) => return Next::Fail(v),
        };
        match (self.sender, h.mask.is_some()) {
            (Sender::Client, false) => return Next::Fail(Violation::protocol("Unmasked frame")),
            (Sender::Server, true) => return Next::Fail(Violation::protocol("Masked frame")),
            _ => {}
        }
        let total = h.header_len + h.payload_len;
        let arrived = buf.len().min(total);
        let payload = &buf[h.header_len..arrived];
        if h.opcode >= OP_CLOSE {
            if !h.fin {
                return Next::Fail(Violation::protocol("Fragmented control frame"));
            }
            if h.payload_len > MAX_CONTROL {
                return Next::Fail(Violation::protocol("Control frame too long"));
            }
            if buf.len() < total {
                return Next::Partial;
            }
            let mut data = payload.to_vec();
            if let Some(key) = h.mask {
                unmask(&mut data, key, 0);
            }
            let control = match h.opcode {
                OP_PING => Control::Ping(data),
                OP_PONG => Control::Pong,
                _ => match close_payload(&data) {
                    Ok(close) => Control::Close(close),
                    Err(v) => return Next::Fail(v),
                },
            };
            return Next::Control {
                len: total,
                control,
            };
        }
        let text = match (h.opcode, self.message) {
            (OP_CONTINUATION, Some(text)) => text,
            (OP_CONTINUATION, None) => {
                return Next::Fail(Violation::protocol("Continuation outside a message"))
            }
            (_, Some(_)) => {
                return Next::Fail(Violation::protocol("New message inside a fragmented one"))
            }
            (op, None) => op == OP_TEXT,
        };
        if text && payload.len() > self.checked {
            let fresh = &payload[self.checked..];
            // ASCII (the usual text) needs no decoding: checked a word at a time.
            let ok = match h.mask {
                None if self.utf8.carried == 0 && fresh.is_ascii() => true,
                None => self.utf8.feed(fresh),
                Some(key) if self.utf8.carried == 0 && masked_ascii(fresh, key, self.checked) => {
                    true
                }
                Some(key) => self.feed_masked(fresh, key, self.checked),
            };
            if !ok {
                return Next::Fail(INVALID_UTF8);
            }
            self.checked = payload.len();
        }
        if buf.len() < total {
            return Next::Partial;
        }
        self.checked = 0;
        if h.fin {
            self.message = None;
            if text && !self.utf8.finish() {
                return Next::Fail(INVALID_UTF8);
            }
        } else {
            self.message = Some(text);
        }
        Next::Data(total)
    }

    /// How many bytes at the head of `buf` are whole frames that
    /// [`Scanner::next`] would return as `Data` on its short path (see
    /// `small_message`), all valid and relayed as they are. Such frames
    /// leave the scanner's state as it was, so a run of them is found
    /// without building a [`Next`] for each.
    pub fn small_run(&self, buf: &[u8]) -> usize {
        let mut at = 0;
        while let Some(len) = self.small_message(&buf[at..]) {
            at += len;
        }
        at
    }

    /// The usual frame on a short path: a whole unfragmented text (ASCII)
    /// or binary message of at most 125 bytes, outside a fragmented message,
    /// masked as its sender must. Its length, or `None` for anything else
    /// (then the full checks in [`Scanner::next`] decide, also for the same
    /// frame).
    #[inline]
    fn small_message(&self, buf: &[u8]) -> Option<usize> {
        // `message` is `None` and nothing is checked of a frame at the head:
        // no fragment state, and no UTF-8 carried over.
        if self.message.is_some() || self.checked != 0 {
            return None;
        }
        let (&b0, &b1) = (buf.first()?, buf.get(1)?);
        // FIN, no reserved bit, text or binary.
        let text = match b0 {
            0x81 => true,
            0x82 => false,
            _ => return None,
        };
        let masked = b1 & 0x80 != 0;
        let len = usize::from(b1 & 0x7F);
        if masked != (self.sender == Sender::Client) || len > 125 || len > self.max_payload {
            return None;
        }
        let head = if masked { 6 } else { 2 };
        let payload = buf.get(head..head + len)?;
        if text {
            let ascii = if masked {
                masked_ascii(payload, [buf[2], buf[3], buf[4], buf[5]], 0)
            } else {
                payload.is_ascii()
            };
            if !ascii {
                return None;
            }
        }
        Some(head + len)
    }

    /// Checks masked text without touching the frame: unmasks a copy, a
    /// stack buffer at a time.
    fn feed_masked(&mut self, data: &[u8], key: [u8; 4], offset: usize) -> bool {
        let mut scratch = [0u8; 1024];
        let mut at = offset;
        for chunk in data.chunks(scratch.len()) {
            let out = &mut scratch[..chunk.len()];
            out.copy_from_slice(chunk);
            unmask(out, key, at);
            if !self.utf8.feed(out) {
                return false;
            }
            at += chunk.len();
        }
        true
    }
}

/// Parses a frame header; `Ok(None)` when more bytes are needed.
fn header(buf: &[u8], max_payload: usize) -> Result<Option<Header>, Violation> {
    let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(Violation::protocol("Reserved bits set"));
    }
    let opcode = b0 & 0x0F;
    if !matches!(
        opcode,
        OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Err(Violation::protocol("Reserved opcode"));
    }
    let (len, mut at) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut be = [0u8; 8];
                be.copy_from_slice(b);
                (u64::from_be_bytes(be), 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    // Over the limit fails at once, before any of the payload is buffered.
    let payload_len = match usize::try_from(len) {
        Ok(n) if n <= max_payload => n,
        _ if len >> 63 != 0 => return Err(Violation::protocol("Invalid frame length")),
        _ => {
            return Err(Violation {
                code: CLOSE_TOO_BIG,
                reason: "Frame too large",
            })
        }
    };
    let mask = if b1 & 0x80 != 0 {
        let Some(k) = buf.get(at..at + 4) else {
            return Ok(None);
        };
        at += 4;
        Some([k[0], k[1], k[2], k[3]])
    } else {
        None
    };
    Ok(Some(Header {
        fin: b0 & 0x80 != 0,
        opcode,
        mask,
        header_len: at,
        payload_len,
    }))
}

/// A close frame's code and reason, checked as RFC 6455 section 7.4 says.
fn close_payload(data: &[u8]) -> Result<Option<(u16, String)>, Violation> {
    match data {
        [] => Ok(None),
        [_] => Err(Violation::protocol("Close frame with a 1-byte payload")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !receivable_close_code(code) {
                return Err(Violation::protocol("Invalid close code"));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| INVALID_UTF8)?;
            Ok(Some((code, reason.to_string())))
        }
    }
}

/// Codes an endpoint may send in a close frame (so may receive): the ones
/// RFC 6455 and the IANA registry define for use, and 3000-4999.
pub fn receivable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// `key` as it applies from payload position `offset` on, once and twice.
fn key_at(key: [u8; 4], offset: usize) -> ([u8; 4], u64) {
    let o = offset % 4;
    let k = [key[o], key[(o + 1) % 4], key[(o + 2) % 4], key[(o + 3) % 4]];
    let wide = u64::from_ne_bytes([k[0], k[1], k[2], k[3], k[0], k[1], k[2], k[3]]);
    (k, wide)
}

/// Whether masked `data` (at payload position `offset`) unmasks to ASCII,
/// without unmasking it.
fn masked_ascii(data: &[u8], key: [u8; 4], offset: usize) -> bool {
    // The key as it applies from `offset` on, in memory order, twice.
    let shift = 8 * (offset % 4) as u32;
    let k = u32::from_ne_bytes(key);
    let k = if cfg!(target_endian = "little") {
        k.rotate_right(shift)
    } else {
        k.rotate_left(shift)
    };
    let wide = u64::from(k) | (u64::from(k) << 32);
    let mut high = 0u64;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        // `chunks_exact(8)`: the conversion cannot fail.
        high |= u64::from_ne_bytes(w.try_into().unwrap_or_default()) ^ wide;
    }
    let k = k.to_ne_bytes();
    for (i, b) in words.remainder().iter().enumerate() {
        high |= u64::from(b ^ k[i % 4]);
    }
    high & 0x8080_8080_8080_8080 == 0
}

/// XORs `data` with `key`, `offset` being the position of `data[0]` in the payload.
pub fn unmask(data: &mut [u8], key: [u8; 4], offset: usize) {
    let (k, wide) = key_at(key, offset);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(w) ^ wide).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= k[i % 4];
    }
}

/// Appends a control frame as a server writes it (unmasked).
pub fn server_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    let payload = &payload[..payload.len().min(MAX_CONTROL)];
    out.push(0x80 | opcode);
    out.push(payload.len() as u8);
    out.extend_from_slice(payload);
}

/// Appends a control frame as a client writes it (masked with `key`).
pub fn client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], key: [u8; 4]) {
    let payload = &payload[..payload.len().min(MAX_CONTROL)];
    out.push(0x80 | opcode);
    out.push(0x80 | payload.len() as u8);
    out.extend_from_slice(&key);
    let start = out.len();
    out.extend_from_slice(payload);
    unmask(&mut out[start..], key, 0);
}

/// A close frame's payload: the code and as much of `reason` as fits
/// (cut at a character boundary); empty without a code.
pub fn close_body(close: Option<(u16, &str)>) -> Vec<u8> {
    let Some((code, reason)) = close else {
        return Vec::new();
    };
    let mut cut = reason.len().min(MAX_CONTROL - 2);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(&reason.as_bytes()[..cut]);
    body
}

/// Incremental UTF-8 check over the fragments of one text message.
#[derive(Debug, Default)]
struct Utf8 {
    /// The start of a character cut off at the end of the last piece.
    carry: [u8; 4],
    carried: usize,
}

impl Utf8 {
    /// Whether everything fed so far can still be (the start of) valid UTF-8.
    fn feed(&mut self, mut data: &[u8]) -> bool {
        if self.carried > 0 {
            let width = match self.carry[0] {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                _ => 4,
            };
            let take = (width - self.carried).min(data.len());
            self.carry[self.carried..self.carried + take].copy_from_slice(&data[..take]);
            self.carried += take;
            data = &data[take..];
            match std::str::from_utf8(&self.carry[..self.carried]) {
                Ok(_) => self.carried = 0,
                Err(e) if e.error_len().is_none() => return true,
                Err(_) => return false,
            }
        }
        match std::str::from_utf8(data) {
            Ok(_) => true,
            // `error_len() == None`: a character cut off at the end, so far valid.
            Err(e) if e.error_len().is_none() => {
                let rest = &data[e.valid_up_to()..];
                self.carry[..rest.len()].copy_from_slice(rest);
                self.carried = rest.len();
                true
            }
            Err(_) => false,
        }
    }

    /// At the end of a message: whether no character was left incomplete.
    fn finish(&mut self) -> bool {
        let complete = self.carried == 0;
        self.carried = 0;
        complete
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
    const MAX: usize = 1 << 20;

    fn frame(fin: bool, opcode: u8, payload: &[u8], key: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let m = if key.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(m | n as u8),
            n if n <= 0xFFFF => {
                out.push(m | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(m | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if let Some(k) = key {
            out.extend_from_slice(&k);
        }
        let body = out.len();
        out.extend_from_slice(payload);
        if let Some(k) = key {
            unmask(&mut out[body..], k, 0);
        }
        out
    }

    fn client(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        frame(fin, opcode, payload, Some(KEY))
    }

    fn code(next: Next) -> Option<u16> {
        match next {
            Next::Fail(v) => Some(v.code),
            _ => None,
        }
    }

    #[test]
    fn whole_frames_are_relayed_as_they_are() {
        let mut s = Scanner::new(Sender::Client, MAX);
        let f = client(true, OP_TEXT, "héllo".as_bytes());
        assert_eq!(s.next(&f), Next::Data(f.len()));
        let big = client(true, OP_BINARY, &vec![9u8; 70_000]);
        assert_eq!(s.next(&big), Next::Data(big.len()));
        let mut s = Scanner::new(Sender::Server, MAX);
        let f = frame(true, OP_TEXT, b"hi", None);
        assert_eq!(s.next(&f), Next::Data(4));
    }

    #[test]
    fn the_short_path_decides_as_the_full_checks_do() {
        let mut frames = Vec::new();
        for key in [Some(KEY), None] {
            for payload in [
                &b""[..],
                b"e",
                &[b'e'; 64],
                &[b'e'; 125],
                &[b'e'; 126],
                "héllo".as_bytes(),
                b"\xFF\xFE",
                b"ok\xCE",
            ] {
                for (fin, op) in [
                    (true, OP_TEXT),
                    (true, OP_BINARY),
                    (false, OP_TEXT),
                    (true, OP_CONTINUATION),
                    (true, OP_PING),
                ] {
                    frames.push(frame(fin, op, payload, key));
                }
            }
        }
        let mut reserved = client(true, OP_TEXT, b"x");
        reserved[0] |= 0x40;
        frames.push(reserved);
        let mut short = 0;
        for f in &frames {
            for end in [f.len(), f.len().saturating_sub(1), 1] {
                for sender in [Sender::Client, Sender::Server] {
                    for max in [MAX, 10] {
                        let bytes = &f[..end];
                        let fast = Scanner::new(sender, max).next(bytes);
                        let full = Scanner::new(sender, max).check(bytes);
                        assert_eq!(fast, full, "{bytes:?} {sender:?} {max}");
                        if Scanner::new(sender, max).small_message(bytes).is_some() {
                            short += 1;
                        }
                    }
                }
            }
            // Inside a fragmented text message the short path steps aside.
            let mut fast = Scanner::new(Sender::Client, MAX);
            let mut full = Scanner::new(Sender::Client, MAX);
            let first = client(false, OP_TEXT, b"\xCE");
            assert_eq!(fast.next(&first), full.check(&first));
            assert_eq!(fast.next(f), full.check(f), "{f:?}");
        }
        // Whole ASCII text and binary frames up to 125 bytes, both senders.
        assert!(short >= 20, "{short}");
        // A run of them ends at the first frame the short path leaves alone.
        let mut run = Vec::new();
        run.extend(client(true, OP_TEXT, &[b'e'; 64]));
        run.extend(client(true, OP_BINARY, b"\xFF"));
        run.extend(client(true, OP_TEXT, b""));
        let whole = run.len();
        run.extend(client(true, OP_PING, b"p"));
        run.extend(client(true, OP_TEXT, b"after the ping"));
        let s = Scanner::new(Sender::Client, MAX);
        assert_eq!(s.small_run(&run), whole);
        assert_eq!(s.small_run(&run[..whole - 1]), whole - 6);
        assert_eq!(s.small_run(&run[whole..]), 0);
    }

    #[test]
    fn a_frame_arriving_byte_by_byte_is_partial_until_complete() {
        let mut s = Scanner::new(Sender::Client, MAX);
        let f = client(true, OP_TEXT, "κόσμε".as_bytes());
        for end in 0..f.len() {
            assert_eq!(s.next(&f[..end]), Next::Partial, "{end}");
        }
        assert_eq!(s.next(&f), Next::Data(f.len()));
    }

    #[test]
    fn invalid_utf8_fails_at_the_bad_byte_even_inside_a_partial_frame() {
        let mut s = Scanner::new(Sender::Client, MAX);
        let mut payload = "κόσμε".as_bytes().to_vec();
        let good = payload.len();
        payload.extend_from_slice(&[0xCE, 0xBA, 0xE1, 0xBD, 0xB9, 0xCF, 0x83, 0xCE, 0xBC]);
        payload.extend_from_slice(&[0xED, 0xA0, 0x80]); // a surrogate
        payload.extend_from_slice(b"more text after it");
        let f = client(true, OP_TEXT, &payload);
        let header = 6;
        assert_eq!(s.next(&f[..header + good]), Next::Partial);
        // The surrogate's second byte already decides.
        assert_eq!(
            code(s.next(&f[..header + good + 9 + 2])),
            Some(CLOSE_INVALID_PAYLOAD)
        );
    }

    #[test]
    fn utf8_is_checked_across_fragments() {
        let text = "Hello-µ@ßöäüàá-UTF-8!!".as_bytes();
        // Split into 1-byte fragments: characters cut between frames.
        let mut s = Scanner::new(Sender::Client, MAX);
        for (i, b) in text.iter().enumerate() {
            let op = if i == 0 { OP_TEXT } else { OP_CONTINUATION };
            let f = client(i == text.len() - 1, op, &[*b]);
            assert_eq!(s.next(&f), Next::Data(f.len()), "{i}");
        }
        // A message ending in a cut character fails at its last frame.
        let mut s = Scanner::new(Sender::Client, MAX);
        assert!(matches!(
            s.next(&client(false, OP_TEXT, b"ok\xCE")),
            Next::Data(_)
        ));
        assert_eq!(
            code(s.next(&client(true, OP_CONTINUATION, b""))),
            Some(CLOSE_INVALID_PAYLOAD)
        );
        // Binary messages are not checked.
        let mut s = Scanner::new(Sender::Client, MAX);
        let f = client(true, OP_BINARY, b"\xFF\xFE");
        assert_eq!(s.next(&f), Next::Data(f.len()));
    }

    #[test]
    fn fragment_order_and_control_rules_are_enforced() {
        let mut s = Scanner::new(Sender::Client, MAX);
        assert_eq!(
            code(s.next(&client(true, OP_CONTINUATION, b"x"))),
            Some(1002)
        );
        let mut s = Scanner::new(Sender::Client, MAX);
        assert!(matches!(
            s.next(&client(false, OP_TEXT, b"a")),
            Next::Data(_)
        ));
        // A ping between fragments is fine; a new message is not.
        let ping = client(true, OP_PING, b"p");
        assert_eq!(
            s.next(&ping),
            Next::Control {
                len: ping.len(),
                control: Control::Ping(b"p".to_vec())
            }
        );
        assert_eq!(code(s.next(&client(true, OP_TEXT, b"b"))), Some(1002));
        let mut s = Scanner::new(Sender::Client, MAX);
        assert_eq!(code(s.next(&client(false, OP_PING, b""))), Some(1002));
        assert_eq!(
            code(Scanner::new(Sender::Client, MAX).next(&client(true, OP_PING, &[0; 126]))),
            Some(1002)
        );
        let mut reserved = client(true, OP_TEXT, b"x");
        reserved[0] |= 0x40;
        assert_eq!(
            code(Scanner::new(Sender::Client, MAX).next(&reserved)),
            Some(1002)
        );
        let mut op = client(true, OP_TEXT, b"x");
        op[0] = 0x83;
        assert_eq!(
            code(Scanner::new(Sender::Client, MAX).next(&op)),
            Some(1002)
        );
        // Masking: clients must, servers must not.
        let plain = frame(true, OP_TEXT, b"x", None);
        assert_eq!(
            code(Scanner::new(Sender::Client, MAX).next(&plain)),
            Some(1002)
        );
        let masked = client(true, OP_TEXT, b"x");
        assert_eq!(
            code(Scanner::new(Sender::Server, MAX).next(&masked)),
            Some(1002)
        );
    }

    #[test]
    fn frames_over_the_limit_fail_on_their_header() {
        let mut s = Scanner::new(Sender::Client, 1000);
        let f = client(true, OP_BINARY, &[0; 1001]);
        assert_eq!(code(s.next(&f[..10])), Some(CLOSE_TOO_BIG));
    }

    #[test]
    fn close_frames_are_checked() {
        let close = |payload: &[u8]| {
            Scanner::new(Sender::Client, MAX).next(&client(true, OP_CLOSE, payload))
        };
        assert!(matches!(
            close(b""),
            Next::Control {
                control: Control::Close(None),
                ..
            }
        ));
        let mut ok = 4001u16.to_be_bytes().to_vec();
        ok.extend_from_slice(b"bye");
        assert!(
            matches!(close(&ok), Next::Control { control: Control::Close(Some((4001, ref r))), .. } if r == "bye")
        );
        assert_eq!(code(close(b"\x03")), Some(1002));
        for bad in [
            0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000,
        ] {
            assert_eq!(code(close(&bad.to_be_bytes())), Some(1002), "{bad}");
        }
        let mut bad_reason = 1000u16.to_be_bytes().to_vec();
        bad_reason.extend_from_slice(b"\xCE\xBA\xE1\xBD");
        assert_eq!(code(close(&bad_reason)), Some(CLOSE_INVALID_PAYLOAD));
    }

    #[test]
    fn unmask_matches_the_bytewise_definition_at_any_offset() {
        let data: Vec<u8> = (0..=255u8).collect();
        for offset in 0..8 {
            let mut fast = data.clone();
            unmask(&mut fast, KEY, offset);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ KEY[(offset + i) % 4])
                .collect();
            assert_eq!(fast, slow, "{offset}");
        }
    }

    #[test]
    fn the_ascii_check_sees_every_high_bit_through_the_mask() {
        for len in 0..40 {
            for offset in 0..4 {
                let plain = vec![b'a'; len];
                let mut masked = plain.clone();
                unmask(&mut masked, KEY, offset);
                assert!(masked_ascii(&masked, KEY, offset), "{len} {offset}");
                for at in 0..len {
                    let mut high = plain.clone();
                    high[at] = 0xC3;
                    unmask(&mut high, KEY, offset);
                    assert!(!masked_ascii(&high, KEY, offset), "{len} {offset} {at}");
                }
            }
        }
    }

    #[test]
    fn written_frames_scan_back() {
        let mut out = Vec::new();
        client_frame(&mut out, OP_CLOSE, &close_body(Some((1001, "going"))), KEY);
        let mut s = Scanner::new(Sender::Client, MAX);
        assert_eq!(
            s.next(&out),
            Next::Control {
                len: out.len(),
                control: Control::Close(Some((1001, "going".into())))
            }
        );
        let mut out = Vec::new();
        server_frame(&mut out, OP_PING, b"");
        assert_eq!(out, [0x89, 0x00]);
        let long = "é".repeat(100);
        let body = close_body(Some((4000, &long)));
        assert!(body.len() <= MAX_CONTROL && std::str::from_utf8(&body[2..]).is_ok());
    }
}

//! UTF-8 decoding of PTY output that may split a multibyte character across
//! two reads.
//!
//! A PTY read ends wherever the kernel buffer ended, often in the middle of
//! a character like `é` (2 bytes) or an emoji (4 bytes). Decoding each read
//! on its own would turn both halves into U+FFFD. [`Utf8Carry`] keeps the
//! incomplete tail (at most 3 bytes) and prepends it to the next read, so
//! every character arrives whole. Bytes that can never form a character
//! (truly invalid input) still become U+FFFD, as a terminal would show them.

use std::borrow::Cow;

/// The longest incomplete UTF-8 sequence (a 4-byte character minus its last byte).
const MAX_CARRY: usize = 3;

/// Decoder state: the incomplete tail of the previous read.
#[derive(Debug, Default)]
pub struct Utf8Carry {
    carry: [u8; MAX_CARRY],
    carry_len: usize,
}

impl Utf8Carry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes `bytes` (with the carried tail in front); an incomplete
    /// character at the end is kept for the next call.
    pub fn decode<'a>(&mut self, bytes: &'a [u8]) -> Cow<'a, str> {
        if self.carry_len == 0 {
            // The usual read: whole characters, maybe one cut at the end,
            // decoded in place.
            match std::str::from_utf8(bytes) {
                Ok(text) => return Cow::Borrowed(text),
                Err(err)
                    if err.error_len().is_none()
                        && bytes.len() - err.valid_up_to() <= MAX_CARRY =>
                {
                    let (valid, tail) = bytes.split_at(err.valid_up_to());
                    self.carry[..tail.len()].copy_from_slice(tail);
                    self.carry_len = tail.len();
                    // valid_up_to marks a verified prefix, so this cannot fail.
                    return Cow::Borrowed(std::str::from_utf8(valid).unwrap_or_default());
                }
                Err(_) => {}
            }
        }
        Cow::Owned(self.decode_carried(bytes))
    }

    fn decode_carried(&mut self, bytes: &[u8]) -> String {
        let mut input = Vec::with_capacity(self.carry_len + bytes.len());
        input.extend_from_slice(&self.carry[..self.carry_len]);
        input.extend_from_slice(bytes);
        self.carry_len = 0;

        let mut out = String::with_capacity(input.len());
        let mut rest: &[u8] = &input;
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    out.push_str(valid);
                    break;
                }
                Err(err) => {
                    let (valid, after) = rest.split_at(err.valid_up_to());
                    // valid_up_to marks a verified prefix, so this cannot fail.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match err.error_len() {
                        // Invalid bytes in the middle: show them as U+FFFD and go on.
                        Some(len) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = after.get(len..).unwrap_or_default();
                        }
                        // The input ends inside a character: carry it to the next read.
                        None => {
                            let keep = after.len().min(MAX_CARRY);
                            self.carry[..keep].copy_from_slice(&after[..keep]);
                            self.carry_len = keep;
                            break;
                        }
                    }
                }
            }
        }
        out
    }

    /// Whatever is still carried, decoded lossily (called once the PTY has
    /// closed, so nothing will complete it).
    pub fn finish(&mut self) -> String {
        let tail = String::from_utf8_lossy(&self.carry[..self.carry_len]).into_owned();
        self.carry_len = 0;
        tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_characters_pass_through() {
        let mut d = Utf8Carry::new();
        assert_eq!(d.decode("héllo €𝄞".as_bytes()), "héllo €𝄞");
        assert_eq!(d.finish(), "");
    }

    #[test]
    fn a_character_split_at_every_position_arrives_whole() {
        for text in ["é", "€", "𝄞", "aé€𝄞b"] {
            let bytes = text.as_bytes();
            for cut in 0..=bytes.len() {
                let mut d = Utf8Carry::new();
                let mut out = d.decode(&bytes[..cut]).into_owned();
                out.push_str(&d.decode(&bytes[cut..]));
                assert_eq!(out, text, "cut at {cut}");
                assert!(!out.contains('\u{FFFD}'));
            }
        }
    }

    #[test]
    fn a_character_split_over_three_reads_arrives_whole() {
        let bytes = "𝄞".as_bytes();
        let mut d = Utf8Carry::new();
        let mut out = d.decode(&bytes[..1]).into_owned();
        out.push_str(&d.decode(&bytes[1..2]));
        out.push_str(&d.decode(&bytes[2..]));
        assert_eq!(out, "𝄞");
    }

    #[test]
    fn many_split_characters_never_produce_replacement_chars() {
        let text = "é".repeat(30_000);
        let bytes = text.as_bytes();
        let mut d = Utf8Carry::new();
        let mut out = String::new();
        // Odd-sized reads split almost every other character.
        for chunk in bytes.chunks(4095) {
            out.push_str(&d.decode(chunk));
        }
        out.push_str(&d.finish());
        assert_eq!(out, text);
    }

    #[test]
    fn invalid_bytes_become_replacement_chars_without_losing_the_rest() {
        let mut d = Utf8Carry::new();
        assert_eq!(d.decode(b"a\xffb\xc3"), "a\u{FFFD}b");
        assert_eq!(d.decode(b"\xa9!"), "é!");
    }

    #[test]
    fn an_unfinished_tail_at_the_end_is_flushed_lossily() {
        let mut d = Utf8Carry::new();
        assert_eq!(d.decode(b"ok\xe2\x82"), "ok");
        assert_eq!(d.finish(), "\u{FFFD}");
        assert_eq!(d.finish(), "");
    }
}

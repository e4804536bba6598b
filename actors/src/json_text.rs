//! JSON string text, eight bytes at a time: finding the bytes a JSON
//! string must escape (a control character, `"`, `\`) and writing strings
//! escaped exactly as serde_json writes them. The frame writers (chat
//! envelopes, history entries, terminal output) and the provider line
//! scanner share it; a byte loop cost four or five times the instructions
//! on every streamed token and every terminal read.

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// High bit set in each byte of `w` that is a control character, `"` or
/// `\`. The lowest flagged byte is always a real one (a borrow can only
/// flag bytes above a real one), which is all [`find_special`] uses.
#[inline]
fn special_mask(w: u64) -> u64 {
    let control = w.wrapping_sub(ONES * 0x20) & !w;
    let quote = w ^ (ONES * u64::from(b'"'));
    let quote = quote.wrapping_sub(ONES) & !quote;
    let backslash = w ^ (ONES * u64::from(b'\\'));
    let backslash = backslash.wrapping_sub(ONES) & !backslash;
    (control | quote | backslash) & HIGHS
}

#[inline]
fn is_special(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Index of the first control character, `"` or `\` in `bytes`.
#[inline]
pub fn find_special(bytes: &[u8]) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    return find_special_sse2(bytes);
    #[cfg(not(target_arch = "x86_64"))]
    return find_special_words(bytes);
}

/// [`find_special_words`] sixteen bytes at a time with SSE2 (part of every
/// x86_64 CPU), the rest of the slice by words: a streamed delta's text and
/// the envelope's strings are found in half the instructions.
#[cfg(target_arch = "x86_64")]
#[inline]
fn find_special_sse2(bytes: &[u8]) -> Option<usize> {
    use std::arch::x86_64::{
        _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8,
    };
    let mut chunks = bytes.chunks_exact(16);
    let mut at = 0;
    for chunk in &mut chunks {
        // SAFETY: SSE2 is always there on x86_64, and the unaligned load
        // reads exactly the 16 bytes of `chunk`.
        let mask = unsafe {
            let v = _mm_loadu_si128(chunk.as_ptr().cast());
            let quote = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
            let backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
            // Below 0x20 (unsigned): the byte is its own minimum with 0x1f.
            let control = _mm_cmpeq_epi8(_mm_min_epu8(v, _mm_set1_epi8(0x1f)), v);
            _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(quote, backslash), control))
        };
        if mask != 0 {
            return Some(at + mask.trailing_zeros() as usize);
        }
        at += 16;
    }
    find_special_words(chunks.remainder()).map(|i| at + i)
}

/// [`find_special`] eight bytes at a time in a `u64`.
#[inline]
fn find_special_words(bytes: &[u8]) -> Option<usize> {
    let mut words = bytes.chunks_exact(8);
    let mut at = 0;
    for word in &mut words {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        let mask = special_mask(u64::from_le_bytes(w));
        if mask != 0 {
            return Some(at + (mask.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&b| is_special(b))
        .map(|i| at + i)
}

/// Appends `s` as a JSON string literal, byte for byte as serde_json's
/// compact formatter writes it: `\"`, `\\`, `\b`, `\f`, `\n`, `\r`, `\t`,
/// `\u00XX` (lowercase hex) for the other control characters, everything
/// else (DEL and non-ASCII included) as it is.
pub fn push_json_str(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    push_json_escaped(out, s);
    out.push('"');
}

/// Appends the inside of `s` as a JSON string literal (as [`push_json_str`]
/// without the quotes), so a string can be written in pieces.
pub fn push_json_escaped(out: &mut String, s: &str) {
    let mut rest = s;
    while let Some(at) = find_special(rest.as_bytes()) {
        // The special byte is ASCII, so `at` and `at + 1` are char boundaries.
        let (span, tail) = rest.split_at(at);
        out.push_str(span);
        let byte = tail.as_bytes()[0];
        match byte {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x08 => out.push_str("\\b"),
            0x0c => out.push_str("\\f"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push_str("\\u00");
                out.push(char::from(HEX[usize::from(byte >> 4)]));
                out.push(char::from(HEX[usize::from(byte & 0xf)]));
            }
        }
        rest = &tail[1..];
    }
    out.push_str(rest);
}

/// Appends `n` in decimal (itoa: the digits two at a time, as serde_json
/// writes numbers).
pub fn push_u64(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_byte_for_byte_as_serde_json_does() {
        let mut every_byte = String::new();
        for c in (0u8..0x80).map(char::from) {
            every_byte.push(c);
        }
        for s in [
            "",
            "plain",
            "exactly8",
            "quote \" backslash \\ newline \n tab \t nul \u{0} del \u{7f}",
            "unicode é ✓ 𝄞 and \u{1f} control at the end\u{1}",
            "\"\"\"\"\"\"\"\"\"\\",
            &every_byte,
            &"0123456789abcdef".repeat(9),
        ] {
            let mut out = String::new();
            push_json_str(&mut out, s);
            assert_eq!(out, serde_json::to_string(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn the_first_special_byte_is_found_wherever_it_is() {
        for len in 0..40 {
            for at in 0..len {
                for special in [b'"', b'\\', b'\n', 0u8, 0x1f] {
                    let mut bytes = vec![b'a'; len];
                    // A byte just above the range and one with the high bit set around it.
                    if at > 0 {
                        bytes[at - 1] = 0x20;
                    }
                    if at + 1 < len {
                        bytes[at + 1] = 0xe9;
                    }
                    bytes[at] = special;
                    assert_eq!(find_special(&bytes), Some(at), "len {len} at {at}");
                }
            }
            assert_eq!(find_special(&vec![b'~'; len]), None);
        }
        assert_eq!(find_special("é✓ 𝄞#[]".as_bytes()), None);
    }

    /// The SSE2 search finds what the word search finds, at every position
    /// of both its sixteen-byte blocks and the remainder, among the bytes
    /// next to the special ranges.
    #[test]
    fn both_searches_agree() {
        let near = [
            0u8, 0x1f, 0x20, b'"', b'#', b'\\', b']', 0x7f, 0x80, 0x9f, 0xa0, 0xff,
        ];
        for len in 0..70 {
            for at in 0..len {
                for &b in &near {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = b;
                    // Something special further on too.
                    if at + 3 < len {
                        bytes[at + 3] = b'"';
                    }
                    assert_eq!(
                        find_special(&bytes),
                        find_special_words(&bytes),
                        "len {len} at {at} byte {b:#x}"
                    );
                }
            }
        }
    }

    #[test]
    fn numbers_are_written_in_decimal() {
        for n in [0, 7, 10, 99, 1234567890, u64::MAX] {
            let mut out = String::new();
            push_u64(&mut out, n);
            assert_eq!(out, n.to_string());
        }
    }
}

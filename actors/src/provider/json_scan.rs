//! A strict reader of JSON objects in place, for the adapters' fast paths
//! (one Claude `text_delta` line per streamed token): no `Value` tree and no
//! allocation, a string is borrowed from the line unless it has escapes.
//!
//! It never decides anything on its own: every function returns `None` when
//! the input is not what it fully understands (an escaped key, a number
//! with a fraction or exponent, nesting deeper than [`MAX_DEPTH`], a
//! duplicate key...), and the caller then takes the `serde_json` path. When
//! it returns `Some`, the input was valid JSON as `serde_json::from_str`
//! reads it (strings with escapes are decoded by serde_json itself), so the
//! fast path and the slow path agree on every line.

use std::borrow::Cow;

use crate::json_text::find_special;

/// Nesting of skipped values handled here; deeper input takes the slow path.
pub const MAX_DEPTH: usize = 16;
/// Longest integer handled here (serde_json reads longer ones as floats,
/// and fails on some).
const MAX_DIGITS: usize = 18;

/// A position in one JSON text.
pub struct Scanner<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Scanner<'a> {
    pub fn new(text: &'a str) -> Self {
        Scanner { text, at: 0 }
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.at).copied()
    }

    /// Skips JSON whitespace (space, tab, CR, LF).
    pub fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    /// Consumes `byte` (after whitespace).
    fn eat(&mut self, byte: u8) -> Option<()> {
        self.ws();
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// Only whitespace is left.
    pub fn end(&mut self) -> Option<()> {
        self.ws();
        (self.at == self.text.len()).then_some(())
    }

    /// A string (after whitespace): borrowed when it has no escape,
    /// otherwise decoded by serde_json.
    pub fn string(&mut self) -> Option<Cow<'a, str>> {
        self.eat(b'"')?;
        let start = self.at;
        let rest = self.bytes().get(start..)?;
        let special = find_special(rest)?;
        match rest[special] {
            b'"' => {
                self.at = start + special + 1;
                return self.text.get(start..start + special).map(Cow::Borrowed);
            }
            // JSON strings hold no raw control characters.
            b'\\' => {}
            _ => return None,
        }
        // An escape: find the closing quote, then let serde_json decode
        // (and check) the whole literal.
        let mut i = start + special;
        loop {
            match self.bytes().get(i)? {
                b'\\' => i += 2,
                b'"' => break,
                _ => i += 1,
            }
        }
        let literal = self.text.get(start - 1..=i)?;
        let decoded: String = serde_json::from_str(literal).ok()?;
        self.at = i + 1;
        Some(Cow::Owned(decoded))
    }

    /// A string (after whitespace) as it is written, without its quotes,
    /// and the length of its decoded text, when every escape in it is one
    /// serde_json writes itself (`\"`, `\\`, `\b`, `\f`, `\n`, `\r`, `\t`,
    /// `\u00xx` in lowercase hex for the other control characters): then
    /// the inside is byte for byte what serde_json writes for the decoded
    /// text, and a frame can copy it without decoding and escaping again.
    /// `None` (nothing consumed) for anything else, which [`Scanner::string`]
    /// then reads.
    pub fn canonical_string(&mut self) -> Option<(&'a str, usize)> {
        let at = self.at;
        let found = self.canonical_inside();
        if found.is_none() {
            self.at = at;
        }
        found
    }

    fn canonical_inside(&mut self) -> Option<(&'a str, usize)> {
        self.eat(b'"')?;
        let start = self.at;
        let bytes = self.bytes();
        let mut i = start;
        // Bytes the escapes save: decoded length = written length - saved.
        let mut saved = 0;
        loop {
            i += find_special(bytes.get(i..)?)?;
            match bytes[i] {
                b'"' => break,
                b'\\' => match *bytes.get(i + 1)? {
                    b'"' | b'\\' | b'b' | b'f' | b'n' | b'r' | b't' => {
                        i += 2;
                        saved += 1;
                    }
                    b'u' => {
                        let hex = bytes.get(i + 2..i + 6)?;
                        let digit = |b: u8| match b {
                            b'0'..=b'9' => Some(b - b'0'),
                            b'a'..=b'f' => Some(b - b'a' + 10),
                            _ => None,
                        };
                        let (Some(0), Some(0), Some(hi), Some(lo)) =
                            (digit(hex[0]), digit(hex[1]), digit(hex[2]), digit(hex[3]))
                        else {
                            return None;
                        };
                        let byte = hi * 16 + lo;
                        // serde_json writes these as their short escapes.
                        if byte >= 0x20 || matches!(byte, 0x08 | 0x09 | 0x0a | 0x0c | 0x0d) {
                            return None;
                        }
                        i += 6;
                        saved += 5;
                    }
                    _ => return None,
                },
                // JSON strings hold no raw control characters.
                _ => return None,
            }
        }
        self.at = i + 1;
        let inside = self.text.get(start..i)?;
        Some((inside, inside.len() - saved))
    }

    /// A string without escapes, or `null` (after whitespace).
    pub fn opt_string(&mut self) -> Option<Option<Cow<'a, str>>> {
        self.ws();
        if self.peek()? == b'n' {
            return self.literal(b"null").map(|_| None);
        }
        self.string().map(Some)
    }

    /// A non-negative integer of at most [`MAX_DIGITS`] digits, or `null`.
    pub fn opt_u64(&mut self) -> Option<Option<u64>> {
        self.ws();
        if self.peek()? == b'n' {
            return self.literal(b"null").map(|_| None);
        }
        let start = self.at;
        let digits = self.digits()?;
        // No fraction or exponent: serde_json would read a float.
        if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        let mut n = 0u64;
        for &d in &self.bytes()[start..start + digits] {
            n = n * 10 + u64::from(d - b'0');
        }
        Some(Some(n))
    }

    /// Digits of a JSON integer (no leading zero), at most [`MAX_DIGITS`].
    fn digits(&mut self) -> Option<usize> {
        let start = self.at;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
        let n = self.at - start;
        let leading_zero = n > 1 && self.bytes()[start] == b'0';
        (n > 0 && n <= MAX_DIGITS && !leading_zero).then_some(n)
    }

    /// Consumes exactly `word` (no whitespace before it).
    pub fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.at + word.len();
        (self.bytes().get(self.at..end)? == word).then(|| self.at = end)
    }

    /// Reads an object key by key: `each` gets every key (without escapes)
    /// and must consume its value (for instance with [`Scanner::skip`]).
    pub fn object(&mut self, mut each: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        self.ws();
        if self.peek()? == b'}' {
            self.at += 1;
            return Some(());
        }
        loop {
            self.entry(&mut each)?;
            if self.object_closed()? {
                return Some(());
            }
        }
    }

    /// Continues an object whose `{` and first entries were read (by the
    /// caller, who knows they were whole entries): from the next `,` or the
    /// closing `}` on, exactly as [`Scanner::object`] reads the rest.
    pub fn object_rest(
        &mut self,
        mut each: impl FnMut(&mut Self, &'a str) -> Option<()>,
    ) -> Option<()> {
        while !self.object_closed()? {
            self.entry(&mut each)?;
        }
        Some(())
    }

    /// One `"key": value` entry; `each` consumes the value.
    fn entry(&mut self, each: &mut impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        let key = match self.string()? {
            Cow::Borrowed(key) => key,
            Cow::Owned(_) => return None,
        };
        self.eat(b':')?;
        each(self, key)
    }

    /// After an entry: `,` (another follows, false) or the closing `}` (true).
    fn object_closed(&mut self) -> Option<bool> {
        self.ws();
        let closed = match self.peek()? {
            b',' => false,
            b'}' => true,
            _ => return None,
        };
        self.at += 1;
        Some(closed)
    }

    /// Skips one value of any kind, checking it.
    pub fn skip(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.ws();
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' => self.object(|s, _| s.skip(depth + 1)),
            b'[' => {
                self.at += 1;
                self.ws();
                if self.peek()? == b']' {
                    self.at += 1;
                    return Some(());
                }
                loop {
                    self.skip(depth + 1)?;
                    self.ws();
                    match self.peek()? {
                        b',' => self.at += 1,
                        b']' => {
                            self.at += 1;
                            return Some(());
                        }
                        _ => return None,
                    }
                }
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' => {
                self.at += 1;
                self.integer()
            }
            b'0'..=b'9' => self.integer(),
            _ => None,
        }
    }

    fn integer(&mut self) -> Option<()> {
        self.digits()?;
        (!matches!(self.peek(), Some(b'.' | b'e' | b'E'))).then_some(())
    }
}

/// Sets `slot` once; a second value for the same key is not handled here
/// (serde_json's derived readers refuse it, a `Value` keeps the last).
pub fn once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value);
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// Skipping a whole text accepts exactly what serde_json accepts, for
    /// everything the scanner handles.
    fn agrees(text: &str) {
        let mut s = Scanner::new(text);
        let fast = s.skip(0).and_then(|_| s.end()).is_some();
        let slow = serde_json::from_str::<Value>(text).is_ok();
        assert!(!fast || slow, "accepted what serde_json refuses: {text:?}");
    }

    #[test]
    fn never_accepts_what_serde_json_refuses() {
        for text in [
            r#"{"a":1}"#,
            r#" { "a" : [1, -2, true, false, null, "x\"y", {"b":{}} ] } "#,
            r#"{"a":01}"#,
            r#"{"a":-}"#,
            r#"{"a":1.5}"#,
            r#"{"a":1e5}"#,
            r#"{"a":"ctrl	tab"}"#,
            r#"{"a":"\x"}"#,
            r#"{"a":"\ud800"}"#,
            r#"{"a":"\u00e9"}"#,
            r#"{"a":1,}"#,
            r#"{"a":1}x"#,
            r#"{"a" 1}"#,
            r#"[1,2"#,
            r#"{"a":tru}"#,
            r#"{"a":"unterminated}"#,
            r#"{"a":"ends in backslash\"#,
            "{\"a\":\"\\",
            r#"{,}"#,
            r#"[,]"#,
            r#"[]"#,
            r#"{}"#,
            "",
        ] {
            agrees(text);
        }
        let deep = format!("{}{}", "[".repeat(40), "]".repeat(40));
        agrees(&deep);
        assert!(
            Scanner::new(&deep).skip(0).is_none(),
            "deep input is left to serde_json"
        );
    }

    #[test]
    fn strings_borrow_unless_escaped() {
        let mut s = Scanner::new(r#""plain" "a\nb\u00e9""#);
        assert!(matches!(s.string(), Some(Cow::Borrowed("plain"))));
        assert_eq!(s.string().as_deref(), Some("a\nb\u{e9}"));
        assert!(s.end().is_some());
    }

    /// What serde_json writes is taken as it is, with the decoded length;
    /// anything else is left to `string` (nothing consumed).
    #[test]
    fn canonical_strings_are_what_serde_json_writes() {
        let mut every_byte = String::new();
        for c in (0u8..0x80).map(char::from) {
            every_byte.push(c);
        }
        for text in [
            "",
            "plain",
            "quote \" backslash \\ newline \n tab \t cr \r bs \u{8} ff \u{c} nul \u{0} us \u{1f} del \u{7f}",
            "é \u{301} 😀 \u{2028}",
            every_byte.as_str(),
        ] {
            let literal = serde_json::to_string(text).unwrap();
            let mut s = Scanner::new(&literal);
            let (inside, len) = s.canonical_string().expect("serde_json's own escapes");
            assert_eq!(inside, &literal[1..literal.len() - 1]);
            assert_eq!(len, text.len(), "{literal}");
            assert!(s.end().is_some());
        }
        for literal in [
            r#""\/""#,
            r#""\u00E9""#,
            r#""\u00e9""#,
            r#""\u0041""#,
            r#""\u000a""#,
            r#""\u001F""#,
            r#""\ud800""#,
            r#""\ud83d\ude00""#,
            r#""\x""#,
            r#""\u00""#,
            r#""unterminated"#,
            "\"raw\ttab\"",
            r#""ends in \"#,
        ] {
            let mut s = Scanner::new(literal);
            assert!(s.canonical_string().is_none(), "{literal}");
            let slow = serde_json::from_str::<String>(literal).ok();
            assert_eq!(s.string().map(Cow::into_owned), slow, "{literal}");
        }
    }

    #[test]
    fn integers_and_nulls() {
        let mut s = Scanner::new("12 null 012");
        assert_eq!(s.opt_u64(), Some(Some(12)));
        assert_eq!(s.opt_u64(), Some(None));
        assert_eq!(s.opt_u64(), None);
        assert_eq!(Scanner::new("-1").opt_u64(), None);
        assert_eq!(Scanner::new("1.0").opt_u64(), None);
        assert_eq!(Scanner::new("1234567890123456789").opt_u64(), None);
    }

    #[test]
    fn duplicate_keys_are_left_to_serde_json() {
        let mut seen = None;
        let got = Scanner::new(r#"{"k":1,"k":2}"#).object(|s, key| {
            assert_eq!(key, "k");
            s.skip(0)?;
            once(&mut seen, ())
        });
        assert!(got.is_none());
    }
}

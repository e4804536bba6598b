//! Auth URL detection in terminal output (PROTOCOL.md section 5).
//!
//! Login flows of the provider CLIs (`claude setup-token`, `gemini`, ...)
//! print a URL the user must open. The gateway finds it and announces it as
//! `{type:"auth_url", url, autoOpen}` so a browser client can show a button:
//!
//! 1. ANSI escape sequences are stripped ([`strip_ansi`]).
//! 2. The stripped text goes into a rolling buffer of
//!    [`URL_TEXT_BUFFER_BYTES`] (32 KiB), so a URL printed over several reads
//!    is still found.
//! 3. URLs are found directly and, when the terminal width wrapped one over
//!    several lines, joined from the continuation lines ([`extract_urls`]).
//! 4. Trailing punctuation is trimmed and only http(s) URLs are kept, in
//!    WHATWG form like the reference's `new URL(..).toString()`
//!    ([`normalize_url`]).
//! 5. A URL that is a prefix of a longer one found at the same time is
//!    dropped (the half-printed form of the same URL).
//! 6. When the chunk says e.g. "continue in your browser", the longest URL
//!    on the lines that chunk wrote is flagged `autoOpen`
//!    ([`should_auto_open`]).
//! 7. A URL that ends the output so far may still continue (CLIs print a
//!    wrapped URL line by line): it is held back until more output shows
//!    where it ends, or [`URL_SETTLE`] passes ([`UrlDetector::flush`]), so
//!    half a URL is never announced, let alone opened.
//!
//! Announcing each URL once per socket is the socket's job (it owns the set
//! of URLs it announced). `OPEN_URL: <url>` in the output is rewritten to
//! `[INFO] Opening in browser: <url>` ([`rewrite_open_url`]).
//!
//! Differences from the reference, all on inputs where it misbehaves: an OSC
//! sequence (`ESC ] ... BEL`) is stripped whole (the reference strips only
//! `ESC ]` and leaves the title text); continuation lines are joined only to
//! a URL that runs to the end of its line (the reference also glued the next
//! word-like line onto `see https://a.com for details`), and never when the
//! next line starts a URL of its own; a URL is never announced before it is
//! complete (rule 7); and the `autoOpen` URL really is announced with
//! `autoOpen: true` (the reference announced every URL with `false` first
//! and then deduplicated the `true` one away).

use std::borrow::Cow;

/// Size of the rolling text buffer URLs are searched in (PROTOCOL.md: 32 KiB).
pub const URL_TEXT_BUFFER_BYTES: usize = 32 * 1024;

/// How far before a new chunk a URL may start and still be completed by it.
/// Older URLs were already found when their own chunks arrived; rescanning
/// the whole 32 KiB for every chunk would cost O(buffer) per read during a
/// large `cat`. Auth URLs are a few hundred bytes; 4 KiB leaves ample room.
pub const URL_LOOKBACK_BYTES: usize = 4 * 1024;

/// A URL found in the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetectedUrl {
    pub url: String,
    /// The output asked for the URL to be opened in a browser.
    pub auto_open: bool,
}

/// How long a URL that may still continue (it ends the output so far) is
/// held back when no more output comes.
pub const URL_SETTLE: std::time::Duration = std::time::Duration::from_millis(200);

/// The rolling text buffer of one PTY.
#[derive(Debug, Default)]
pub struct UrlDetector {
    text: String,
    /// A URL ended the output so far and may continue in the next chunk
    /// (CLIs print a wrapped URL line by line): it is held back, so the half
    /// URL is never announced, let alone auto-opened.
    pending: Option<Pending>,
}

#[derive(Debug, Clone)]
struct Pending {
    /// The held-back URL as far as it is known (its completion starts with it).
    url: String,
    /// The output that carried it asked for it to be opened.
    cue: bool,
}

impl UrlDetector {
    pub fn new() -> Self {
        Self::default()
    }

    /// A URL is held back: call [`flush`](Self::flush) after [`URL_SETTLE`]
    /// if no more output arrives.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Adds one chunk of raw output and returns the URLs visible around it,
    /// except one that may still continue.
    pub fn feed(&mut self, chunk: &str) -> Vec<DetectedUrl> {
        self.feed_checked(chunk, true)
    }

    /// `feed`; `quick`: a chunk that cannot complete a URL only moves the
    /// text buffer on (tests compare it with the full scan).
    fn feed_checked(&mut self, chunk: &str, quick: bool) -> Vec<DetectedUrl> {
        let clean = strip_ansi(chunk);
        if quick && !self.may_hold_url(&clean) {
            // What `scan` finds in a region without a scheme: nothing, and
            // no URL held back any more.
            self.pending = None;
            self.keep_tail(&clean);
            return Vec::new();
        }
        let mut chunk_start = self.text.len();
        if clean.len() >= URL_TEXT_BUFFER_BYTES {
            // The chunk alone fills the buffer: only its tail stays (what
            // appending it whole and cutting the front would keep).
            let cut = ceil_char_boundary(&clean, clean.len() - URL_TEXT_BUFFER_BYTES);
            self.text.clear();
            self.text.push_str(&clean[cut..]);
            chunk_start = 0;
        } else {
            self.text.push_str(&clean);
            if self.text.len() > URL_TEXT_BUFFER_BYTES {
                let cut = ceil_char_boundary(&self.text, self.text.len() - URL_TEXT_BUFFER_BYTES);
                self.text.drain(..cut);
                chunk_start = chunk_start.saturating_sub(cut);
            }
        }
        // The cue speaks about the chunk that carried it: the URL to open is
        // the longest on the lines this chunk wrote, not an older one in view.
        // Only looked for when there is a URL to open.
        let cue = Cue {
            chunk: &clean,
            chunk_start,
        };
        self.scan(Some(cue), clean.len(), true)
    }

    /// Whether the text with `clean` after it holds an `http(s)://`
    /// anywhere (the scan region is part of it): in the chunk, in the
    /// text, or across the two (a scheme is eight bytes at most).
    fn may_hold_url(&self, clean: &str) -> bool {
        if contains_http(clean.as_bytes()) || contains_http(self.text.as_bytes()) {
            return true;
        }
        let (old, new) = (self.text.as_bytes(), clean.as_bytes());
        let mut seam = [0u8; 14];
        let before = &old[old.len().saturating_sub(7)..];
        let after = &new[..new.len().min(7)];
        seam[..before.len()].copy_from_slice(before);
        seam[before.len()..before.len() + after.len()].copy_from_slice(after);
        contains_http(&seam[..before.len() + after.len()])
    }

    /// The text buffer after appending `clean` (the cap cuts its front as
    /// in [`feed`](Self::feed)), less what no later scan reads: everything
    /// before the line in which the next lookback window starts. A later
    /// scan's region then starts at the same byte as with the whole
    /// buffer (the line start it searches for is this one or a later one),
    /// and only that line and the last [`URL_LOOKBACK_BYTES`] are copied
    /// instead of up to [`URL_TEXT_BUFFER_BYTES`] per chunk.
    fn keep_tail(&mut self, clean: &str) {
        let old_len = self.text.len();
        let total = old_len + clean.len();
        // Positions count in the text followed by `clean`.
        let floor = |at: usize| {
            if at >= old_len {
                old_len + floor_char_boundary(clean, at - old_len)
            } else {
                floor_char_boundary(&self.text, at)
            }
        };
        let cut = if clean.len() >= URL_TEXT_BUFFER_BYTES {
            old_len + ceil_char_boundary(clean, clean.len() - URL_TEXT_BUFFER_BYTES)
        } else if total > URL_TEXT_BUFFER_BYTES {
            // Inside the old text: `clean` alone is below the cap.
            ceil_char_boundary(&self.text, total - URL_TEXT_BUFFER_BYTES)
        } else {
            0
        };
        let window = floor(cut.max(total.saturating_sub(URL_LOOKBACK_BYTES)));
        // The last line break in [cut, window), searched in `clean` first.
        let in_clean = (window > old_len)
            .then(|| {
                let from = cut.max(old_len) - old_len;
                memchr::memrchr(b'\n', &clean.as_bytes()[from..window - old_len])
                    .map(|i| old_len + from + i)
            })
            .flatten();
        let newline = in_clean.or_else(|| {
            (cut < old_len)
                .then(|| {
                    memchr::memrchr(b'\n', &self.text.as_bytes()[cut..window.min(old_len)])
                        .map(|i| cut + i)
                })
                .flatten()
        });
        let keep = newline.map_or(cut, |i| i + 1);
        if keep >= old_len {
            self.text.clear();
            self.text.push_str(&clean[keep - old_len..]);
        } else {
            self.text.drain(..keep);
            self.text.push_str(clean);
        }
    }

    /// Announces a held-back URL as it stands.
    pub fn flush(&mut self) -> Vec<DetectedUrl> {
        if self.pending.is_none() {
            return Vec::new();
        }
        self.scan(None, 0, false)
    }

    /// URLs near the end of the text. `cue`: the new chunk, which may ask
    /// for a URL to be opened.
    fn scan(&mut self, cue: Option<Cue<'_>>, new_len: usize, defer: bool) -> Vec<DetectedUrl> {
        let held = self.pending.take();
        // Search from the start of the line where the lookback window begins,
        // so a URL is never cut at its front.
        let window = self.text.len().saturating_sub(new_len + URL_LOOKBACK_BYTES);
        let window = floor_char_boundary(&self.text, window);
        let start = self.text[..window].rfind('\n').map_or(0, |i| i + 1);
        let region = &self.text[start..];
        if !contains_http(region.as_bytes()) {
            return Vec::new();
        }
        // When the chunk asks for a URL to be opened, its lines start here.
        let cue_from = cue.filter(|c| should_auto_open(c.chunk)).map(|c| {
            let chunk_start = floor_char_boundary(&self.text, c.chunk_start);
            self.text[..chunk_start].rfind('\n').map_or(0, |i| i + 1)
        });

        let mut urls = detect(region);
        let open = if defer { open_url(region) } else { None };
        // This chunk's cue is for the longest URL on the lines it wrote.
        let chunk_best = cue_from.and_then(|from| {
            let from = floor_char_boundary(&self.text, from.min(self.text.len()));
            longest(detect(&self.text[from..]).iter())
        });
        if let Some(open) = &open {
            // The open URL and its shorter forms wait for the rest; a cue
            // for it (now or while it was held) waits with it.
            urls.retain(|u| !open.starts_with(u.as_str()));
            let continued = held.as_ref().filter(|h| open.starts_with(h.url.as_str()));
            self.pending = Some(Pending {
                url: open.clone(),
                cue: continued.is_some_and(|h| h.cue) || chunk_best.as_ref() == Some(open),
            });
        }
        if urls.is_empty() {
            return Vec::new();
        }
        // A held-back URL that asked to be opened: its completion.
        let open_held = held
            .filter(|h| h.cue)
            .and_then(|h| longest(urls.iter().filter(|u| u.starts_with(h.url.as_str()))));
        let open_now = chunk_best.filter(|best| urls.contains(best));
        urls.into_iter()
            .map(|url| {
                let auto_open = open_held.as_deref() == Some(url.as_str())
                    || open_now.as_deref() == Some(url.as_str());
                DetectedUrl { url, auto_open }
            })
            .collect()
    }
}

/// The chunk just fed, and where it starts in the text buffer.
#[derive(Clone, Copy)]
struct Cue<'a> {
    chunk: &'a str,
    chunk_start: usize,
}

/// The longest of some URLs (the first of equals).
fn longest<'a>(urls: impl Iterator<Item = &'a String>) -> Option<String> {
    urls.fold(None::<&String>, |best, url| match best {
        Some(b) if b.len() >= url.len() => Some(b),
        _ => Some(url),
    })
    .cloned()
}

/// The URL the text may still be in the middle of: the text ends (but for
/// whitespace with at most one line break, since an empty line ends a
/// wrapped URL) with the end of a URL candidate. Its normalized form.
fn open_url(text: &str) -> Option<String> {
    let body = text.trim_end();
    if body.is_empty() || text[body.len()..].matches('\n').count() > 1 {
        return None;
    }
    let token = body
        .rsplit(char::is_whitespace)
        .next()
        .filter(|t| !t.is_empty())?;
    extract_urls(text)
        .into_iter()
        .filter(|raw| raw.ends_with(token))
        .filter_map(|raw| normalize_url(&raw))
        .max_by_key(String::len)
}

/// Every normalized http(s) URL in `text`, without duplicates and without
/// URLs that are a prefix of a longer one, in order of appearance.
pub fn detect(text: &str) -> Vec<String> {
    let mut normalized: Vec<String> = Vec::new();
    for raw in extract_urls(text) {
        if let Some(url) = normalize_url(&raw) {
            if !normalized.contains(&url) {
                normalized.push(url);
            }
        }
    }
    normalized
        .iter()
        .filter(|url| {
            !normalized
                .iter()
                .any(|other| other != *url && other.starts_with(url.as_str()))
        })
        .cloned()
        .collect()
}

/// Removes ANSI escape sequences: CSI (`ESC [ ... final`), OSC (`ESC ] ...
/// BEL` or `ESC ] ... ESC \`) and two-byte escapes (`ESC` + `@`..`Z`, `\`..`_`).
/// An escape that is cut off (the rest comes in the next chunk) is left as is.
pub fn strip_ansi(s: &str) -> Cow<'_, str> {
    let bytes = s.as_bytes();
    let Some(first) = memchr::memchr(0x1b, bytes) else {
        // Most output (a `cat`, a build log) has no escape at all.
        return Cow::Borrowed(s);
    };
    let mut out = String::with_capacity(s.len());
    let mut copied = 0;
    let mut i = first;
    while let Some(off) = memchr::memchr(0x1b, &bytes[i..]) {
        let esc = i + off;
        let end = escape_end(bytes, esc);
        match end {
            Some(end) => {
                out.push_str(&s[copied..esc]);
                copied = end;
                i = end;
            }
            None => i = esc + 1,
        }
    }
    out.push_str(&s[copied..]);
    Cow::Owned(out)
}

/// End (exclusive) of the escape sequence starting at `esc`, if complete.
/// Every byte inspected is ASCII, so the result is a char boundary.
fn escape_end(bytes: &[u8], esc: usize) -> Option<usize> {
    let kind = *bytes.get(esc + 1)?;
    match kind {
        b'[' => {
            let mut j = esc + 2;
            while matches!(bytes.get(j), Some(0x30..=0x3f)) {
                j += 1;
            }
            while matches!(bytes.get(j), Some(0x20..=0x2f)) {
                j += 1;
            }
            match bytes.get(j) {
                Some(0x40..=0x7e) => Some(j + 1),
                _ => None,
            }
        }
        b']' => {
            let mut j = esc + 2;
            loop {
                match bytes.get(j)? {
                    0x07 => return Some(j + 1),
                    0x1b if bytes.get(j + 1) == Some(&b'\\') => return Some(j + 2),
                    _ => j += 1,
                }
            }
        }
        0x40..=0x5a | 0x5c..=0x5f => Some(esc + 2),
        _ => None,
    }
}

/// Characters that end a URL in the direct match (`[^\s<>"'`\\\x1b\x07]`).
fn ends_url(c: char) -> bool {
    c.is_whitespace() || matches!(c, '<' | '>' | '"' | '\'' | '`' | '\\' | '\x1b' | '\x07')
}

/// Characters a continuation line of a wrapped URL consists of.
fn is_url_continuation_char(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            '-' | '.'
                | '_'
                | '~'
                | ':'
                | '/'
                | '?'
                | '#'
                | '['
                | ']'
                | '@'
                | '!'
                | '$'
                | '&'
                | '\''
                | '('
                | ')'
                | '*'
                | '+'
                | ','
                | ';'
                | '='
                | '%'
        )
}

/// The first URL (`https?://` case-insensitively, then at least one URL
/// character) at or after `from`: its byte range.
fn find_url(text: &str, from: usize) -> Option<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut i = from;
    // A URL starts with `h` or `H`: jump from one to the next (SIMD), not
    // byte by byte; both are ASCII, so every candidate is a char boundary.
    while let Some(off) = bytes.get(i..).and_then(|b| memchr::memchr2(b'h', b'H', b)) {
        let at = i + off;
        let rest = &bytes[at..];
        let scheme_len = if starts_with_ignore_ascii_case(rest, b"https://") {
            8
        } else if starts_with_ignore_ascii_case(rest, b"http://") {
            7
        } else {
            0
        };
        if scheme_len > 0 {
            let body = at + scheme_len;
            let end = text[body..]
                .char_indices()
                .find(|&(_, c)| ends_url(c))
                .map_or(text.len(), |(k, _)| body + k);
            if end > body {
                return Some((at, end));
            }
        }
        i = at + 1;
    }
    None
}

/// Raw URL candidates: every direct match, plus URLs wrapped over lines
/// joined with their continuation lines; duplicates removed.
pub fn extract_urls(text: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    let mut push = |url: &str| {
        if !found.iter().any(|u| u == url) {
            found.push(url.to_string());
        }
    };

    let mut from = 0;
    while let Some((start, end)) = find_url(text, from) {
        push(&text[start..end]);
        from = end;
    }

    let lines: Vec<&str> = text.split('\n').map(str::trim).collect();
    for (i, line) in lines.iter().enumerate() {
        let Some((start, end)) = find_url(line, 0) else {
            continue;
        };
        let mut combined = line[start..end].to_string();
        if end == line.len() {
            for next in lines.iter().skip(i + 1) {
                if next.is_empty()
                    || find_url(next, 0).is_some_and(|(start, _)| start == 0)
                    || !next.chars().all(is_url_continuation_char)
                {
                    break;
                }
                combined.push_str(next);
            }
        }
        push(&combined);
    }
    found
}

/// Trailing punctuation that is sentence text, not part of a URL.
fn is_trailing_punctuation(c: char) -> bool {
    matches!(c, ')' | ']' | '}' | '>' | '.' | ',' | ';' | ':' | '!' | '?')
}

/// Trims the URL and its trailing punctuation; `None` unless it parses as an
/// http(s) URL. The result is the WHATWG serialization (lowercase scheme and
/// host, `/` for an empty path), as `new URL(..).toString()` gives.
pub fn normalize_url(raw: &str) -> Option<String> {
    let cleaned = raw.trim().trim_end_matches(is_trailing_punctuation);
    if cleaned.is_empty() {
        return None;
    }
    let parsed = url::Url::parse(cleaned).ok()?;
    match parsed.scheme() {
        "http" | "https" => Some(parsed.into()),
        _ => None,
    }
}

/// Whether the chunk asks for its URL to be opened in a browser.
pub fn should_auto_open(chunk: &str) -> bool {
    let lower = chunk.to_lowercase();
    [
        "browser didn't open",
        "open this url",
        "continue in your browser",
        "press enter to open",
        "open_url:",
    ]
    .iter()
    .any(|cue| lower.contains(cue))
}

/// Rewrites `OPEN_URL: <url>` to `[INFO] Opening in browser: <url>` (the
/// marker some CLIs print when they cannot open a browser themselves).
pub fn rewrite_open_url(chunk: &str) -> Cow<'_, str> {
    const MARKER: &str = "OPEN_URL:";
    if memchr::memmem::find(chunk.as_bytes(), MARKER.as_bytes()).is_none() {
        return Cow::Borrowed(chunk);
    }
    let mut out = String::with_capacity(chunk.len() + 32);
    let mut copied = 0;
    let mut search = 0;
    while let Some(off) = chunk[search..].find(MARKER) {
        let at = search + off;
        let after_marker = at + MARKER.len();
        let url_start = chunk[after_marker..]
            .char_indices()
            .find(|&(_, c)| !c.is_whitespace())
            .map_or(chunk.len(), |(k, _)| after_marker + k);
        let rest = &chunk[url_start..];
        let scheme_len = if rest.starts_with("https://") {
            8
        } else if rest.starts_with("http://") {
            7
        } else {
            0
        };
        let url_end = if scheme_len > 0 {
            let body = url_start + scheme_len;
            chunk[body..]
                .char_indices()
                .find(|&(_, c)| c.is_whitespace() || c == '\x1b' || c == '\x07')
                .map_or(chunk.len(), |(k, _)| body + k)
                .max(body)
        } else {
            0
        };
        if scheme_len > 0 && url_end > url_start + scheme_len {
            out.push_str(&chunk[copied..at]);
            out.push_str("[INFO] Opening in browser: ");
            out.push_str(&chunk[url_start..url_end]);
            copied = url_end;
            search = url_end;
        } else {
            search = after_marker;
        }
    }
    out.push_str(&chunk[copied..]);
    Cow::Owned(out)
}

fn starts_with_ignore_ascii_case(haystack: &[u8], prefix: &[u8]) -> bool {
    haystack.len() >= prefix.len() && haystack[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// Whether `haystack` holds `http://` or `https://` in any case, which
/// every URL [`find_url`] accepts starts with: `://` is looked for with
/// SIMD, then the scheme before it. (Looking for `h` instead stopped at
/// nearly every line of ordinary output, `path=` or `the`.)
fn contains_http(haystack: &[u8]) -> bool {
    memchr::memmem::find_iter(haystack, b"://").any(|at| {
        let before = &haystack[..at];
        before.len() >= 4 && before[before.len() - 4..].eq_ignore_ascii_case(b"http")
            || before.len() >= 5 && before[before.len() - 5..].eq_ignore_ascii_case(b"https")
    })
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_char_boundary(s: &str, mut i: usize) -> usize {
    while i < s.len() && !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(out: &[DetectedUrl]) -> Vec<(&str, bool)> {
        out.iter().map(|d| (d.url.as_str(), d.auto_open)).collect()
    }

    /// The reference's own case: a URL wrapped over two lines, with an ANSI
    /// reset right after it, in a chunk that asks to continue in the browser.
    #[test]
    fn wrapped_url_with_ansi_reset_is_joined_and_auto_opened() {
        let mut d = UrlDetector::new();
        // It ends the output, so it may go on: held back until more output or the settle time.
        let out =
            d.feed("Continue in your browser: https://example.com/authorize?\ncode=abc\x1b[0m");
        assert!(out.is_empty());
        assert!(d.has_pending());
        assert_eq!(
            urls(&d.flush()),
            vec![("https://example.com/authorize?code=abc", true)]
        );
        assert!(!d.has_pending());
    }

    #[test]
    fn wrapped_url_without_a_cue_is_not_auto_opened() {
        let mut d = UrlDetector::new();
        let out =
            d.feed("Visit: https://example.com/authorize?\r\ncode=abc&state=x\x1b[0m\r\n\r\n");
        assert_eq!(
            urls(&out),
            vec![("https://example.com/authorize?code=abc&state=x", false)]
        );
    }

    /// CLIs print a wrapped URL line by line: the first line alone must not
    /// be announced (or opened) as the URL.
    #[test]
    fn a_url_printed_line_by_line_is_announced_whole() {
        let mut d = UrlDetector::new();
        assert!(d
            .feed("Continue in your browser: https://example.com/authorize?\r\n")
            .is_empty());
        assert!(d.feed("client_id=1&\r\n").is_empty());
        let out = d.feed("state=xyz\x1b[0m\r\n\r\nPaste code here > ");
        assert_eq!(
            urls(&out),
            vec![("https://example.com/authorize?client_id=1&state=xyz", true)]
        );
        assert!(!d.has_pending());
    }

    #[test]
    fn a_held_back_cue_and_a_new_cue_each_open_their_own_url() {
        let mut d = UrlDetector::new();
        assert!(d
            .feed("Continue in your browser: https://example.com/authorize?\r\ncode=abc\x1b[0m\r\n")
            .is_empty());
        let out = d.feed("\r\nOPEN_URL: https://login.example/x\r\nall done\r\n");
        let mut got = urls(&out);
        got.sort();
        assert_eq!(
            got,
            vec![
                ("https://example.com/authorize?code=abc", true),
                ("https://login.example/x", true)
            ]
        );
    }

    #[test]
    fn a_cue_for_a_held_back_url_does_not_open_its_neighbour() {
        let mut d = UrlDetector::new();
        let out = d.feed(
            "Docs: https://a.example/d\r\nOpen this URL: https://login.example/authorize?x=1",
        );
        assert_eq!(urls(&out), vec![("https://a.example/d", false)]);
        let out = d.feed("&y=2\r\n\r\n");
        assert_eq!(
            urls(&out),
            vec![
                ("https://a.example/d", false),
                ("https://login.example/authorize?x=1&y=2", true)
            ]
        );
    }

    #[test]
    fn complete_urls_are_not_held_back_by_an_open_one() {
        let mut d = UrlDetector::new();
        let out = d.feed("docs: https://docs.example/x done\r\nlogin: https://login.example/a");
        assert_eq!(urls(&out), vec![("https://docs.example/x", false)]);
        assert_eq!(
            urls(&d.flush()),
            vec![
                ("https://docs.example/x", false),
                ("https://login.example/a", false)
            ]
        );
    }

    #[test]
    fn url_wrapped_over_three_lines_is_joined() {
        let out = detect(
            "https://claude.ai/oauth/authorize?cl\nient_id=123&redir\nect=x\n\nPaste code here",
        );
        assert_eq!(
            out,
            vec!["https://claude.ai/oauth/authorize?client_id=123&redirect=x"]
        );
    }

    #[test]
    fn ansi_is_stripped_before_searching() {
        assert_eq!(
            strip_ansi("\x1b[1;32mgreen\x1b[0m \x1b]0;title\x07x\x1b]8;;u\x1b\\y\x1bMz"),
            "green xyz"
        );
        let out = detect("\x1b[4mhttps://example.com/login\x1b[24m\n");
        assert_eq!(out, vec!["https://example.com/login"]);
    }

    #[test]
    fn an_incomplete_escape_is_left_alone() {
        assert_eq!(strip_ansi("a\x1b[3"), "a\x1b[3");
        assert_eq!(strip_ansi("a\x1b"), "a\x1b");
        assert_eq!(strip_ansi("é\x1b]0;t"), "é\x1b]0;t");
    }

    #[test]
    fn trailing_punctuation_is_trimmed() {
        assert_eq!(
            normalize_url("https://example.com/a)."),
            Some("https://example.com/a".into())
        );
        assert_eq!(
            normalize_url("https://example.com/a?x=1!?"),
            Some("https://example.com/a?x=1".into())
        );
        assert_eq!(
            detect("(see https://example.com/path).\n"),
            vec!["https://example.com/path"]
        );
    }

    #[test]
    fn only_http_and_https_are_kept() {
        assert_eq!(normalize_url("ftp://example.com/x"), None);
        assert_eq!(normalize_url("https://"), None);
        assert_eq!(
            normalize_url("HTTPS://Example.COM"),
            Some("https://example.com/".into())
        );
        assert!(detect("file:///etc/passwd javascript:alert(1) ws://x.y/").is_empty());
    }

    #[test]
    fn a_prefix_of_a_longer_url_is_dropped() {
        let out = detect("https://example.com/auth\nhttps://example.com/auth?code=1\n");
        assert_eq!(out, vec!["https://example.com/auth?code=1"]);
    }

    #[test]
    fn distinct_urls_are_all_kept_in_order() {
        let out = detect("first https://a.example/x then https://b.example/y done");
        assert_eq!(out, vec!["https://a.example/x", "https://b.example/y"]);
    }

    #[test]
    fn a_word_on_the_next_line_is_not_glued_to_a_finished_url() {
        let out = detect("see https://a.example for details\nfoo\n");
        assert_eq!(out, vec!["https://a.example/"]);
    }

    #[test]
    fn each_auto_open_cue_is_recognised() {
        for cue in [
            "Browser didn't open? Use the url below",
            "Please open this URL to sign in",
            "Continue in your browser",
            "Press Enter to open the login page",
            "OPEN_URL: https://x.example",
        ] {
            assert!(should_auto_open(cue), "{cue}");
        }
        assert!(!should_auto_open("Login successful"));
    }

    #[test]
    fn the_longest_url_gets_auto_open_when_there_are_several() {
        let mut d = UrlDetector::new();
        let out = d.feed(
            "Docs https://a.example/d. Open this URL: https://login.example/authorize?x=1 now\n",
        );
        assert_eq!(
            urls(&out),
            vec![
                ("https://a.example/d", false),
                ("https://login.example/authorize?x=1", true)
            ]
        );
    }

    #[test]
    fn auto_open_goes_to_the_url_of_the_chunk_with_the_cue() {
        let mut d = UrlDetector::new();
        d.feed("Docs: https://docs.example.com/a/very/long/path/to/the/manual\r\n\r\n");
        let out = d.feed("OPEN_URL: https://login.example/x\r\nopening the browser\r\n");
        assert_eq!(
            urls(&out),
            vec![
                (
                    "https://docs.example.com/a/very/long/path/to/the/manual",
                    false
                ),
                ("https://login.example/x", true)
            ]
        );
    }

    #[test]
    fn a_url_split_across_chunks_is_found_once_complete() {
        let mut d = UrlDetector::new();
        assert!(d.feed("Visit https://example.com/auth").is_empty());
        let second = d.feed("orize?code=42 to log in\r\n");
        assert_eq!(
            urls(&second),
            vec![("https://example.com/authorize?code=42", false)]
        );
    }

    #[test]
    fn the_rolling_buffer_stays_bounded() {
        let mut d = UrlDetector::new();
        let line = "x".repeat(1000) + "\n";
        for _ in 0..100 {
            assert!(d.feed(&line).is_empty());
        }
        assert!(d.text.len() <= URL_TEXT_BUFFER_BYTES);
        // Multibyte text is trimmed on a char boundary.
        for _ in 0..40 {
            d.feed(&"é".repeat(999));
        }
        assert!(d.text.len() <= URL_TEXT_BUFFER_BYTES);
    }

    #[test]
    fn urls_far_behind_the_new_chunk_are_not_rescanned() {
        let mut d = UrlDetector::new();
        assert_eq!(d.feed("https://old.example/x\n\n").len(), 1);
        d.feed(&("y".repeat(100) + "\n").repeat(60));
        assert!(d.feed("no url here\n").is_empty());
    }

    #[test]
    fn open_url_marker_is_rewritten() {
        assert_eq!(
            rewrite_open_url("OPEN_URL: https://example.com/a?b=1\r\nnext"),
            "[INFO] Opening in browser: https://example.com/a?b=1\r\nnext"
        );
        assert_eq!(
            rewrite_open_url("x OPEN_URL:http://h/p\x1b[0m y"),
            "x [INFO] Opening in browser: http://h/p\x1b[0m y"
        );
        assert_eq!(
            rewrite_open_url("OPEN_URL: not a url"),
            "OPEN_URL: not a url"
        );
        assert_eq!(rewrite_open_url("OPEN_URL: https://"), "OPEN_URL: https://");
        assert!(matches!(rewrite_open_url("plain text"), Cow::Borrowed(_)));
    }

    /// The quick path (a chunk without a scheme only moves the buffer on)
    /// finds exactly what the full scan finds, chunk by chunk, across
    /// long lines, the 32 KiB cap, schemes split between chunks, escapes
    /// and multibyte text.
    #[test]
    fn the_quick_path_finds_what_the_full_scan_finds() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let plain = [
            "plain text ",
            "é€𝄞 ",
            "\r\n",
            "\n",
            "continue in your browser ",
            "\x1b[1m",
            "\x1b]0;t\x07",
            "path=/api/items/42 status=200 ",
        ];
        let urlish = [
            "https://example.com/auth?x=1 ",
            "HTTP://a.b/",
            "htt",
            "p",
            "s:",
            "//x.y/z\r\n",
            "OPEN_URL: https://o.p/q\n",
        ];
        let mut quick_chunks = 0;
        for round in 0..40 {
            let (mut quick, mut full) = (UrlDetector::new(), UrlDetector::new());
            for _ in 0..60 {
                let mut chunk = String::new();
                let long = next(4) == 0;
                let len = if long { 40_000 } else { next(3_000) as usize };
                while chunk.len() < len {
                    if long && next(3) > 0 {
                        chunk.push_str(&"w".repeat(next(9_000) as usize));
                    }
                    chunk.push_str(if next(40) == 0 {
                        urlish[next(urlish.len() as u64) as usize]
                    } else {
                        plain[next(plain.len() as u64) as usize]
                    });
                }
                if !quick.may_hold_url(&strip_ansi(&chunk)) {
                    quick_chunks += 1;
                }
                assert_eq!(
                    quick.feed_checked(&chunk, true),
                    full.feed_checked(&chunk, false),
                    "round {round}"
                );
                if next(5) == 0 {
                    assert_eq!(quick.flush(), full.flush(), "round {round}");
                }
            }
        }
        assert!(quick_chunks > 300, "quick path taken {quick_chunks} times");
    }

    #[test]
    fn only_an_http_scheme_counts_as_a_url_start() {
        assert!(contains_http(b"see https://a.com"));
        assert!(contains_http(b"HtTp://a"));
        assert!(contains_http(b"xHTTPS://"));
        assert!(!contains_http(b"path=/api/items http status"));
        assert!(!contains_http(b"ftp://a.com ://x tps://"));
        assert!(!contains_http(b"://"));
        assert_eq!(find_url("h hx https://a.b/c d", 0), Some((5, 18)));
        assert_eq!(find_url("https://a", 1), None);
        assert_eq!(find_url("é http://x", 0), Some((3, 11)));
        assert_eq!(find_url("abc", 7), None);
    }

    #[test]
    fn garbage_never_panics() {
        let mut d = UrlDetector::new();
        for s in [
            "\x1b",
            "\x1b[",
            "\x1b]",
            "http",
            "https://",
            "h\u{e9}ttp://\u{1F600}",
            "OPEN_URL:",
            "\n\n\r",
        ] {
            d.feed(s);
            let _ = rewrite_open_url(s);
            let _ = detect(s);
        }
    }
}

//! Server-side terminal state of one PTY (extension of PROTOCOL.md section
//! 5): output goes through a `vt100` parser, so a client that reattaches
//! while a full-screen program (vim, htop, less, a TUI in the alternate
//! screen) runs gets the current screen redrawn instead of a replay of raw
//! chunks that no longer start where the program drew its frame.
//!
//! Cost: parsing every byte costs about as much CPU as the kernel's PTY
//! itself (vt100 allocates a row per scrolled line), which would cut the
//! throughput of a plain `cat` by half or more. The redraw is only used
//! while the alternate screen is active (in the normal screen a reattach
//! gets the raw replay, which also keeps the scrollback), so in the normal
//! screen only the escape sequences are parsed: they carry everything that
//! outlives the switch to the alternate screen (input modes, attributes,
//! title, the switch itself), while printable text and line feeds only move
//! the normal screen's cells, which no redraw shows. From the switch on,
//! every byte is parsed. An escape sequence split across two reads is
//! carried over (bounded by [`MAX_PARTIAL_ESCAPE`]).
//!
//! The parser keeps no scrollback, so its memory is bounded by the terminal
//! size, itself bounded by [`MAX_TERM_COLS`](super::MAX_TERM_COLS) x
//! [`MAX_TERM_ROWS`](super::MAX_TERM_ROWS). A panic inside the parser (it
//! parses arbitrary program output) is caught: the state is reset and the
//! PTY keeps running; only the redraw is lost.

use std::panic::{catch_unwind, AssertUnwindSafe};

use super::TermSize;

/// Longest escape sequence carried from one read to the next in the normal
/// screen; a longer one (a huge OSC 52 clipboard write) is skipped.
pub const MAX_PARTIAL_ESCAPE: usize = 4096;

const ESC: u8 = 0x1b;

pub struct Screen {
    parser: vt100::Parser,
    /// An escape sequence cut off at the end of the previous read (normal screen only).
    partial: String,
    /// Times a vt100 panic reset the state (the tests expect none).
    resets: u32,
}

impl std::fmt::Debug for Screen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (rows, cols) = self.parser.screen().size();
        f.debug_struct("Screen")
            .field("rows", &rows)
            .field("cols", &cols)
            .field("alternate", &self.in_alternate_screen())
            .finish()
    }
}

/// The model's size for a terminal of `size`: at least two columns and two
/// rows. vt100 cannot place a wide character in one column (its column
/// arithmetic overflowed and panicked) nor wrap it on a one-row screen (its
/// row arithmetic did), both found by `fuzz/` terminal_output.
fn model_size(size: TermSize) -> (u16, u16) {
    (size.rows.max(2), size.cols.max(2))
}

impl Screen {
    pub fn new(size: TermSize) -> Self {
        let (rows, cols) = model_size(size);
        Self {
            parser: vt100::Parser::new(rows, cols, 0),
            partial: String::new(),
            resets: 0,
        }
    }

    /// Feeds program output (see the module doc for what is parsed when).
    pub fn process(&mut self, text: &str) {
        if self.in_alternate_screen() {
            self.feed(text);
            return;
        }
        let joined;
        let input = if self.partial.is_empty() {
            text
        } else {
            let mut carried = std::mem::take(&mut self.partial);
            carried.push_str(text);
            joined = carried;
            joined.as_str()
        };
        let bytes = input.as_bytes();
        let mut i = 0;
        while let Some(off) = memchr::memchr(ESC, &bytes[i..]) {
            let esc = i + off;
            match escape_sequence_end(bytes, esc) {
                Sequence::Complete(end) => {
                    // Sequences start and end with ASCII bytes: char boundaries.
                    self.feed(&input[esc..end]);
                    i = end;
                    if self.in_alternate_screen() {
                        self.feed(&input[end..]);
                        return;
                    }
                }
                Sequence::Invalid(next) => i = next,
                Sequence::Incomplete => {
                    if bytes.len() - esc <= MAX_PARTIAL_ESCAPE {
                        self.partial = input[esc..].to_string();
                    }
                    return;
                }
            }
        }
    }

    /// Hands bytes to the parser; a panic resets the state.
    fn feed(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        let parser = &mut self.parser;
        if catch_unwind(AssertUnwindSafe(|| parser.process(text.as_bytes()))).is_err() {
            let (rows, cols) = self.parser.screen().size();
            tracing::warn!(
                rows,
                cols,
                "terminal state parser panicked; screen state reset"
            );
            self.parser = vt100::Parser::new(rows, cols, 0);
            self.resets += 1;
        }
    }

    /// Follows a PTY resize.
    pub fn resize(&mut self, size: TermSize) {
        let (rows, cols) = model_size(size);
        let parser = &mut self.parser;
        if catch_unwind(AssertUnwindSafe(|| parser.set_size(rows, cols))).is_err() {
            tracing::warn!(
                rows,
                cols,
                "terminal state resize panicked; screen state reset"
            );
            self.parser = vt100::Parser::new(rows, cols, 0);
            self.resets += 1;
        }
    }

    /// Whether a full-screen program holds the alternate screen.
    pub fn in_alternate_screen(&self) -> bool {
        self.parser.screen().alternate_screen()
    }

    /// Escape sequences that turn a fresh terminal into the current screen:
    /// switch to the alternate screen if the program uses it, then clear,
    /// draw every cell with its attributes, put the cursor back and restore
    /// the input modes (application keypad/cursor, bracketed paste, mouse)
    /// and the title. Meaningful while the alternate screen is active.
    pub fn redraw(&self) -> String {
        let screen = self.parser.screen();
        let mut out = Vec::new();
        if screen.alternate_screen() {
            out.extend_from_slice(b"\x1b[?1049h");
        }
        out.extend_from_slice(&screen.state_formatted());
        // vt100 writes the cells it parsed from valid UTF-8, so this is lossless.
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The visible text (tests, diagnostics; in the normal screen only
    /// what escape sequences drew).
    pub fn contents(&self) -> String {
        self.parser.screen().contents()
    }
}

enum Sequence {
    /// The sequence ends (exclusive) here.
    Complete(usize),
    /// Not a sequence the parser would act on; resume scanning here.
    Invalid(usize),
    /// The input ends inside it.
    Incomplete,
}

/// Where the escape sequence at `esc` ends (ECMA-48): CSI `ESC [ params
/// intermediates final`; OSC, DCS, SOS, PM, APC strings up to BEL or
/// `ESC \`; otherwise `ESC intermediates final`.
fn escape_sequence_end(bytes: &[u8], esc: usize) -> Sequence {
    let Some(&kind) = bytes.get(esc + 1) else {
        return Sequence::Incomplete;
    };
    match kind {
        b'[' => {
            let mut j = esc + 2;
            loop {
                match bytes.get(j) {
                    None => return Sequence::Incomplete,
                    Some(0x20..=0x3f) => j += 1,
                    Some(0x40..=0x7e) => return Sequence::Complete(j + 1),
                    // A new escape cancels this one.
                    Some(&ESC) => return Sequence::Invalid(j),
                    // Terminals execute controls inside a CSI and go on with it.
                    Some(0x00..=0x1f) => j += 1,
                    Some(_) => return Sequence::Invalid(j),
                }
            }
        }
        b']' | b'P' | b'X' | b'^' | b'_' => {
            let mut j = esc + 2;
            loop {
                match bytes.get(j) {
                    None => return Sequence::Incomplete,
                    Some(0x07) => return Sequence::Complete(j + 1),
                    Some(&ESC) => {
                        return match bytes.get(j + 1) {
                            None => Sequence::Incomplete,
                            Some(b'\\') => Sequence::Complete(j + 2),
                            Some(_) => Sequence::Invalid(j),
                        }
                    }
                    Some(_) => j += 1,
                }
            }
        }
        _ => {
            let mut j = esc + 1;
            loop {
                match bytes.get(j) {
                    None => return Sequence::Incomplete,
                    Some(0x20..=0x2f) => j += 1,
                    Some(0x30..=0x7e) => return Sequence::Complete(j + 1),
                    Some(_) => return Sequence::Invalid(j),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(cols: u16, rows: u16) -> TermSize {
        TermSize { cols, rows }
    }

    /// The inputs fuzz/ (terminal_output) found, replayed as the target
    /// does (first byte the size, reads split at 0xFF, through the UTF-8
    /// carry): vt100 panicked on a one-column and on a one-row terminal
    /// (caught, but the screen state was reset).
    #[test]
    fn fuzz_regressions_keep_the_screen() {
        let inputs: [&[u8]; 2] = [
            include_bytes!("../../../fuzz/regressions/terminal_output/crash-5c6c88078f4e60fa2b0ebe2da5d3b834f5a5d985"),
            include_bytes!("../../../fuzz/regressions/terminal_output/crash-22f9bd869d9818817975b3d169e0f4e23ae73c76"),
        ];
        for input in inputs {
            let (&b, rest) = input.split_first().unwrap();
            let mut s = Screen::new(size(u16::from(b % 200) + 1, u16::from(b % 60) + 1));
            let mut carry = crate::shell::utf8::Utf8Carry::new();
            for read in rest.split(|&x| x == 0xff) {
                s.process(&carry.decode(read));
            }
            assert_eq!(s.resets, 0, "vt100 panicked on {input:?}");
        }
    }

    /// Found by fuzz/ (terminal_output): a wide character on a one-column
    /// terminal overflowed vt100's column arithmetic; the panic was caught
    /// but reset the screen (the full-screen program's state was lost).
    #[test]
    fn a_wide_character_on_a_one_column_terminal_keeps_the_screen() {
        for resized in [false, true] {
            let mut s = Screen::new(size(if resized { 80 } else { 1 }, 1));
            if resized {
                s.resize(size(1, 1));
            }
            s.process("\x1b[?1049h");
            s.process("\u{4e2d}");
            assert!(s.in_alternate_screen(), "the screen was reset");
            assert!(s.contents().contains('\u{4e2d}'), "{:?}", s.contents());
        }
    }

    #[test]
    fn redraw_reproduces_a_full_screen_program() {
        let mut s = Screen::new(size(40, 10));
        s.process("shell prompt $ vim\r\n");
        s.process("\x1b[?1049h\x1b[H\x1b[2J");
        for i in 0..500 {
            s.process(&format!("\x1b[{};1Hscroll {i}", i % 10 + 1));
        }
        s.process("\x1b[H\x1b[2J\x1b[3;5H\x1b[1mTITLE\x1b[0m\x1b[5;1Hbody é€");
        assert!(s.in_alternate_screen());

        let redraw = s.redraw();
        assert!(redraw.starts_with("\x1b[?1049h"));

        // A fresh terminal fed only with the redraw shows the same screen.
        let mut client = vt100::Parser::new(10, 40, 0);
        client.process(redraw.as_bytes());
        assert!(client.screen().alternate_screen());
        assert_eq!(client.screen().contents(), s.contents());
        assert_eq!(client.screen().cursor_position(), (4, 7));
        assert!(client
            .screen()
            .cell(2, 4)
            .is_some_and(|c| c.bold() && c.contents() == "T"));
        assert!(!client.screen().contents().contains("scroll"));
    }

    #[test]
    fn the_switch_in_the_middle_of_a_read_after_a_lot_of_text_is_seen() {
        let mut s = Screen::new(size(20, 4));
        let text = "plain line\r\n".repeat(10_000);
        s.process(&format!(
            "{text}\x1b[1;31mred\x1b[0m\x1b[?2004h\x1b[?1049h\x1b[2;3HTUI"
        ));
        assert!(s.in_alternate_screen());
        let mut client = vt100::Parser::new(4, 20, 0);
        client.process(s.redraw().as_bytes());
        assert!(client.screen().alternate_screen());
        assert!(
            client.screen().bracketed_paste(),
            "a mode set in the normal screen carries over"
        );
        assert_eq!(client.screen().contents().trim(), "TUI");
        assert_eq!(
            client.screen().cell(1, 2).map(|c| c.contents()),
            Some("T".to_string())
        );
    }

    #[test]
    fn an_escape_split_across_reads_is_carried() {
        let seq = "\x1b[?1049h";
        for cut in 1..seq.len() {
            let mut s = Screen::new(size(20, 4));
            s.process(&format!("text {}", &seq[..cut]));
            assert!(!s.in_alternate_screen());
            s.process(&format!("{}XY", &seq[cut..]));
            assert!(s.in_alternate_screen(), "cut at {cut}");
            assert_eq!(s.contents().trim(), "XY");
        }
        // An OSC cut right after the ESC of its terminator.
        let mut s = Screen::new(size(20, 4));
        s.process("\x1b]0;my title\x1b");
        s.process("\\\x1b[?1049h");
        assert!(s.in_alternate_screen());
        assert!(s.redraw().contains("my title"));
    }

    #[test]
    fn leaving_and_reentering_the_alternate_screen() {
        let mut s = Screen::new(size(20, 4));
        s.process("\x1b[?1049hvim\x1b[?1049l");
        assert!(!s.in_alternate_screen());
        s.process(&"after\r\n".repeat(100));
        s.process("\x1b[?1049h\x1b[H\x1b[2Jless");
        assert!(s.in_alternate_screen());
        assert_eq!(s.contents().trim(), "less");
    }

    #[test]
    fn an_endless_sequence_is_dropped_not_buffered() {
        let mut s = Screen::new(size(20, 4));
        s.process(&format!("\x1b]52;c;{}", "A".repeat(MAX_PARTIAL_ESCAPE * 2)));
        assert!(s.partial.is_empty());
        s.process("\x1b[?1049hok");
        assert!(s.in_alternate_screen());
        assert_eq!(s.contents().trim(), "ok");
    }

    #[test]
    fn leaving_the_alternate_screen_is_tracked() {
        let mut s = Screen::new(size(20, 5));
        s.process("\x1b[?1049hfull\x1b[?1049l");
        assert!(!s.in_alternate_screen());
        assert!(!s.redraw().starts_with("\x1b[?1049h"));
    }

    #[test]
    fn resize_follows_the_pty() {
        let mut s = Screen::new(size(80, 24));
        s.resize(size(120, 40));
        s.process("\x1b[?1049h");
        s.process(&"x".repeat(119));
        assert_eq!(s.contents().lines().next().map(str::len), Some(119));
    }

    #[test]
    fn garbage_does_not_panic() {
        let mut s = Screen::new(size(3, 2));
        for junk in [
            "\x1b[99999;99999H",
            "\x1b[?9999h",
            "\x1b[38;2;300;300;300m",
            "\x1b]0;\x07",
            "\u{FFFD}\x1b\x1b[",
            "\t\t\t\t\x08\x08",
            "\x1b[1\x1b[?1049h",
            "\x1b[\u{e9}",
            "\x1bP\x1bx",
        ] {
            s.process(junk);
        }
        s.resize(size(1, 1));
        s.process("abc\r\n");
        let _ = s.redraw();
    }
}

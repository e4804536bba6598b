//! Server-side terminal state of one PTY (extension of PROTOCOL.md section
//! 5): every output byte also goes through a `vt100` parser, so a client
//! that reattaches while a full-screen program (vim, htop, less, a TUI in
//! the alternate screen) runs gets the current screen redrawn instead of a
//! replay of raw chunks that no longer start where the program drew its
//! frame.
//!
//! The parser keeps no scrollback (history is the replay buffer's job), so
//! its memory is bounded by the terminal size, which is bounded by
//! [`MAX_TERM_COLS`](super::MAX_TERM_COLS) x [`MAX_TERM_ROWS`](super::MAX_TERM_ROWS).
//! A panic inside the parser (it parses arbitrary program output) is caught:
//! the state is reset and the PTY keeps running; only the redraw is lost.

use std::panic::{catch_unwind, AssertUnwindSafe};

use super::TermSize;

pub struct Screen {
    parser: vt100::Parser,
}

impl std::fmt::Debug for Screen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (rows, cols) = self.parser.screen().size();
        f.debug_struct("Screen")
            .field("rows", &rows)
            .field("cols", &cols)
            .finish()
    }
}

impl Screen {
    pub fn new(size: TermSize) -> Self {
        Self {
            parser: vt100::Parser::new(size.rows, size.cols, 0),
        }
    }

    /// Feeds program output.
    pub fn process(&mut self, text: &str) {
        let parser = &mut self.parser;
        if catch_unwind(AssertUnwindSafe(|| parser.process(text.as_bytes()))).is_err() {
            let (rows, cols) = self.parser.screen().size();
            tracing::warn!(
                rows,
                cols,
                "terminal state parser panicked; screen state reset"
            );
            self.parser = vt100::Parser::new(rows, cols, 0);
        }
    }

    /// Follows a PTY resize.
    pub fn resize(&mut self, size: TermSize) {
        let parser = &mut self.parser;
        if catch_unwind(AssertUnwindSafe(|| parser.set_size(size.rows, size.cols))).is_err() {
            tracing::warn!(
                rows = size.rows,
                cols = size.cols,
                "terminal state resize panicked; screen state reset"
            );
            self.parser = vt100::Parser::new(size.rows, size.cols, 0);
        }
    }

    /// Whether a full-screen program holds the alternate screen.
    pub fn in_alternate_screen(&self) -> bool {
        self.parser.screen().alternate_screen()
    }

    /// Escape sequences that turn a fresh terminal into the current screen:
    /// switch to the alternate screen if the program uses it, then clear,
    /// draw every cell with its attributes, put the cursor back and restore
    /// the input modes (application keypad/cursor, bracketed paste, mouse).
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

    /// The visible text (tests, diagnostics).
    pub fn contents(&self) -> String {
        self.parser.screen().contents()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(cols: u16, rows: u16) -> TermSize {
        TermSize { cols, rows }
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
        ] {
            s.process(junk);
        }
        s.resize(size(1, 1));
        s.process("abc\r\n");
        let _ = s.redraw();
    }
}

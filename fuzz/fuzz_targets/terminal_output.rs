//! PTY output as a terminal session handles it: raw reads (split where the
//! input has 0xFF) through the UTF-8 carry, then URL detection (ANSI
//! stripping, wrapped URLs, OPEN_URL rewriting) and the screen model.
//! Checked: for valid UTF-8 input the carry returns exactly the input.
#![no_main]
use agentgate_actors::shell::screen::Screen;
use agentgate_actors::shell::url_detect::{self, UrlDetector};
use agentgate_actors::shell::utf8::Utf8Carry;
use agentgate_actors::shell::TermSize;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (size, data) = match data.split_first() {
        Some((&b, rest)) => (
            TermSize {
                cols: u16::from(b % 200) + 1,
                rows: u16::from(b % 60) + 1,
            },
            rest,
        ),
        None => return,
    };
    let mut carry = Utf8Carry::new();
    let mut detector = UrlDetector::new();
    let mut screen = Screen::new(size);
    let mut decoded = String::new();
    for read in data.split(|&b| b == 0xff) {
        let text = carry.decode(read);
        let shown = url_detect::rewrite_open_url(&text);
        let _ = url_detect::should_auto_open(&shown);
        let _ = detector.feed(&shown);
        screen.process(&shown);
        decoded.push_str(&text);
    }
    decoded.push_str(&carry.finish());
    let _ = detector.flush();
    let _ = url_detect::strip_ansi(&decoded);
    let _ = url_detect::extract_urls(&decoded);
    screen.resize(TermSize {
        cols: size.rows,
        rows: size.cols.min(500),
    });
    let _ = screen.redraw();
    let _ = screen.contents();
    if !data.contains(&0xff) {
        if let Ok(whole) = std::str::from_utf8(data) {
            assert_eq!(decoded, whole, "the carry changed valid UTF-8");
        }
    }
});

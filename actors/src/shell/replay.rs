//! The byte-bounded output history of one PTY, replayed to a socket that
//! reattaches (PROTOCOL.md section 5; extension: bounded in bytes, the
//! reference only counts chunks).
//!
//! When full, the oldest output is dropped. A replay that no longer starts
//! at the beginning of the PTY's output starts at the first line break after
//! the cut, so the client does not begin in the middle of a line or an
//! escape sequence.

use std::collections::VecDeque;

/// Default bound of the replay buffer (issue 4: 1 MiB).
pub const REPLAY_BUFFER_BYTES: usize = 1024 * 1024;

/// The output as one ring of bytes, always whole characters: a push copies
/// the chunk in and moves the front, with no allocation per chunk once the
/// ring has grown to the cap (a `String` per chunk cost an allocation, a
/// free and the move of a partly cut front chunk on every PTY read).
#[derive(Debug)]
pub struct ReplayBuffer {
    ring: VecDeque<u8>,
    /// `ring.len()` never exceeds it after a push.
    cap: usize,
    /// Output was dropped from the front at least once.
    truncated: bool,
}

/// A UTF-8 continuation byte (never the first byte of a character).
fn is_continuation(b: u8) -> bool {
    b & 0xC0 == 0x80
}

impl ReplayBuffer {
    pub fn new(cap: usize) -> Self {
        Self {
            ring: VecDeque::new(),
            cap: cap.max(1),
            truncated: false,
        }
    }

    pub fn len_bytes(&self) -> usize {
        self.ring.len()
    }

    pub fn is_truncated(&self) -> bool {
        self.truncated
    }

    /// Appends output; drops the oldest output beyond the cap (from a char
    /// boundary on).
    pub fn push(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        if text.len() > self.cap {
            // Keep only the tail of a chunk larger than the whole buffer.
            let mut cut = text.len() - self.cap;
            while !text.is_char_boundary(cut) {
                cut += 1;
            }
            self.truncated = true;
            self.ring.clear();
            self.grow_for(text.len() - cut);
            self.ring.extend(&text.as_bytes()[cut..]);
            return;
        }
        let excess = (self.ring.len() + text.len()).saturating_sub(self.cap);
        if excess > 0 {
            // excess <= ring.len() here, and the ring ends on a char
            // boundary: the cut moves on to the next character's start.
            self.truncated = true;
            self.ring.drain(..excess);
            while self.ring.front().is_some_and(|&b| is_continuation(b)) {
                self.ring.pop_front();
            }
        }
        self.grow_for(text.len());
        self.ring.extend(text.as_bytes());
    }

    /// Room for `more` bytes, growing by doubling but never past the cap
    /// (plain `reserve` could double a full ring to twice the cap).
    fn grow_for(&mut self, more: usize) {
        let need = self.ring.len() + more;
        let have = self.ring.capacity();
        if need > have {
            let target = (have * 2).clamp(need, self.cap.max(need));
            self.ring.reserve_exact(target - self.ring.len());
        }
    }

    /// The buffered output as one string (a copy; replays are rare).
    fn text(&self) -> String {
        let (a, b) = self.ring.as_slices();
        let mut bytes = Vec::with_capacity(a.len() + b.len());
        bytes.extend_from_slice(a);
        bytes.extend_from_slice(b);
        // Only whole characters go in and come out, so this is never lossy.
        String::from_utf8(bytes)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    /// The buffered output in frames of at most about `frame_bytes` each,
    /// each on a char boundary; after truncation it starts after the first
    /// line break (if there is one).
    pub fn frames(&self, frame_bytes: usize) -> Vec<String> {
        let frame_bytes = frame_bytes.max(4);
        let all = self.text();
        let mut rest = all.as_str();
        if self.truncated {
            match rest.find('\n') {
                Some(i) => rest = &rest[i + 1..],
                // No line break at all after the cut: replay the raw tail rather than nothing.
                None => return raw_frames(&all, frame_bytes),
            }
        }
        let mut frames = Vec::new();
        while !rest.is_empty() {
            let mut take = frame_bytes.min(rest.len());
            while !rest.is_char_boundary(take) {
                take -= 1;
            }
            if take == 0 {
                // A character longer than a frame: none is (frame_bytes >= 4).
                take = rest.chars().next().map_or(rest.len(), char::len_utf8);
            }
            frames.push(rest[..take].to_string());
            rest = &rest[take..];
        }
        frames
    }
}

fn raw_frames(all: &str, frame_bytes: usize) -> Vec<String> {
    let mut frames = Vec::new();
    let mut rest = all;
    while !rest.is_empty() {
        let mut take = frame_bytes.min(rest.len());
        while !rest.is_char_boundary(take) {
            take += 1;
        }
        frames.push(rest[..take].to_string());
        rest = &rest[take..];
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_everything_below_the_cap() {
        let mut b = ReplayBuffer::new(100);
        b.push("hello ");
        b.push("world\r\n");
        assert!(!b.is_truncated());
        assert_eq!(b.frames(1024), vec!["hello world\r\n"]);
    }

    #[test]
    fn bounded_in_bytes_dropping_the_oldest() {
        let mut b = ReplayBuffer::new(1000);
        for i in 0..10_000 {
            b.push(&format!("line {i}\r\n"));
            assert!(b.len_bytes() <= 1000);
        }
        assert!(b.is_truncated());
        let all: String = b.frames(64).concat();
        assert!(all.ends_with("line 9999\r\n"));
        // The replay starts at a line start, not inside a line.
        assert!(all.starts_with("line "), "{all:?}");
    }

    #[test]
    fn a_chunk_larger_than_the_cap_keeps_its_tail() {
        let mut b = ReplayBuffer::new(10);
        b.push(&"é".repeat(20));
        assert!(b.len_bytes() <= 10);
        assert!(b.frames(4).concat().chars().all(|c| c == 'é'));
    }

    #[test]
    fn frames_respect_the_size_and_char_boundaries() {
        let mut b = ReplayBuffer::new(1 << 20);
        let text = "aé€𝄞".repeat(1000);
        b.push(&text);
        let frames = b.frames(7);
        assert!(frames.iter().all(|f| !f.is_empty() && f.len() <= 7));
        assert_eq!(frames.concat(), text);
    }

    /// The ring wraps many times over; what it holds is always the last
    /// `cap` bytes (from a char start), as one string of whole characters.
    #[test]
    fn the_ring_keeps_the_tail_across_wraps() {
        let mut b = ReplayBuffer::new(1000);
        let mut all = String::new();
        for i in 0..5_000 {
            let chunk = format!("{i} é€𝄞 {}\r\n", "x".repeat(i % 300));
            b.push(&chunk);
            all.push_str(&chunk);
            assert!(b.len_bytes() <= 1000);
            assert!(b.ring.capacity() <= 2000, "grew to {}", b.ring.capacity());
        }
        let held = b.text();
        assert!(all.ends_with(&held));
        let mut cut = all.len() - 1000;
        while !all.is_char_boundary(cut) {
            cut += 1;
        }
        assert_eq!(held, all[cut..]);
        let replay = b.frames(64).concat();
        let first_break = held.find('\n').unwrap();
        assert_eq!(replay, held[first_break + 1..]);
    }

    #[test]
    fn truncated_without_any_line_break_still_replays() {
        let mut b = ReplayBuffer::new(10);
        b.push("abcdefghijklmnop");
        assert_eq!(b.frames(100).concat(), "ghijklmnop");
    }
}

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

#[derive(Debug)]
pub struct ReplayBuffer {
    chunks: VecDeque<String>,
    /// Sum of the chunks' lengths; never above `cap` after a push.
    bytes: usize,
    cap: usize,
    /// Output was dropped from the front at least once.
    truncated: bool,
}

impl ReplayBuffer {
    pub fn new(cap: usize) -> Self {
        Self {
            chunks: VecDeque::new(),
            bytes: 0,
            cap: cap.max(1),
            truncated: false,
        }
    }

    pub fn len_bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_truncated(&self) -> bool {
        self.truncated
    }

    /// Appends output; drops the oldest output beyond the cap.
    pub fn push(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        // Keep only the tail of a chunk larger than the whole buffer.
        let text = if text.len() > self.cap {
            let mut cut = text.len() - self.cap;
            while !text.is_char_boundary(cut) {
                cut += 1;
            }
            self.truncated = true;
            self.chunks.clear();
            self.bytes = 0;
            &text[cut..]
        } else {
            text
        };
        self.chunks.push_back(text.to_string());
        self.bytes += text.len();

        while self.bytes > self.cap {
            let excess = self.bytes - self.cap;
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            self.truncated = true;
            if front.len() <= excess {
                self.bytes -= front.len();
                self.chunks.pop_front();
            } else {
                let mut cut = excess;
                while !front.is_char_boundary(cut) {
                    cut += 1;
                }
                front.drain(..cut);
                self.bytes -= cut;
            }
        }
    }

    /// The buffered output in frames of at most about `frame_bytes` each,
    /// each on a char boundary; after truncation it starts after the first
    /// line break (if there is one).
    pub fn frames(&self, frame_bytes: usize) -> Vec<String> {
        let frame_bytes = frame_bytes.max(4);
        let mut frames: Vec<String> = Vec::new();
        let mut current = String::new();
        let mut skip_to_newline = self.truncated;
        for chunk in &self.chunks {
            let mut chunk: &str = chunk;
            if skip_to_newline {
                match chunk.find('\n') {
                    Some(i) => {
                        chunk = &chunk[i + 1..];
                        skip_to_newline = false;
                    }
                    None => continue,
                }
            }
            while !chunk.is_empty() {
                let room = frame_bytes.saturating_sub(current.len());
                if room == 0 {
                    frames.push(std::mem::take(&mut current));
                    continue;
                }
                let mut take = room.min(chunk.len());
                while !chunk.is_char_boundary(take) {
                    take -= 1;
                }
                if take == 0 {
                    // The next char does not fit into what is left of this frame.
                    frames.push(std::mem::take(&mut current));
                    continue;
                }
                current.push_str(&chunk[..take]);
                chunk = &chunk[take..];
            }
        }
        if skip_to_newline && frames.is_empty() && current.is_empty() {
            // No line break at all after the cut: replay the raw tail rather than nothing.
            return self.raw_frames(frame_bytes);
        }
        if !current.is_empty() {
            frames.push(current);
        }
        frames
    }

    fn raw_frames(&self, frame_bytes: usize) -> Vec<String> {
        let all: String = self.chunks.iter().map(String::as_str).collect();
        let mut frames = Vec::new();
        let mut rest = all.as_str();
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

    #[test]
    fn truncated_without_any_line_break_still_replays() {
        let mut b = ReplayBuffer::new(10);
        b.push("abcdefghijklmnop");
        assert_eq!(b.frames(100).concat(), "ghijklmnop");
    }
}

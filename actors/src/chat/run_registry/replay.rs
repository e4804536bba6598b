//! A session's replay buffer: the last sequenced events (contiguous seqs,
//! oldest first) with their frames, held by the RunRegistry (not an actor).
//!
//! **Representation** (what one buffered event costs beside its bytes): a
//! slot of 40 bytes, the frame's handle and the session's byte count after
//! it; its seq is implied by its place, and the provider read time (for
//! the delivery-latency metric) is kept once per run of events that share
//! it (a `RunEvents` batch), not per event. Frames up to
//! [`ARENA_MAX_FRAME`] bytes are kept in per-session chunks (copied there,
//! or a text delta's written there in the first place) of up to
//! [`ARENA_CHUNK_MAX`] bytes, many frames to one allocation: a 300-byte
//! delta frame of its own cost a malloc header, its size rounded up, and a
//! 32-byte refcount block (allocated when the frame is first shared), i.e.
//! about 50 bytes, for every event kept for minutes. A chunk is freed when
//! the last frame cut from it is gone (evicted from here and written by
//! every socket), so a socket holding frames pins at most the chunks they
//! were cut from, which are contiguous in the stream. Larger frames are kept
//! as they came (one allocation each, no copy).
//!
//! **Bounds**: at most [`REPLAY_MAX_EVENTS`] events and [`REPLAY_MAX_BYTES`]
//! frame bytes (oldest dropped first, the newest always kept); the chunk
//! being filled adds at most [`ARENA_CHUNK_MAX`] bytes per session. Events
//! from a floor on ([`ReplayBuffer::keep_from`]: where a client closed with
//! 4008 left off, for its resubscription) are kept beyond these bounds, up
//! to [`REPLAY_STRETCH_EVENTS`] and [`REPLAY_STRETCH_BYTES`] more; past
//! those they are dropped as any others.

use std::collections::VecDeque;
use std::sync::Arc;

use actix_web::web::BytesMut;
use bytestring::ByteString;
use tokio::time::Instant;

use crate::protocol::Frame;

use super::{REPLAY_MAX_BYTES, REPLAY_MAX_EVENTS, REPLAY_STRETCH_BYTES, REPLAY_STRETCH_EVENTS};

/// Frames up to this size are copied into the session's chunks.
pub const ARENA_MAX_FRAME: usize = 4 * 1024;
/// A session's first chunk; each next one is twice as large, up to
/// [`ARENA_CHUNK_MAX`], so a session with a few events holds a few hundred
/// bytes, not a whole chunk.
const ARENA_CHUNK_MIN: usize = 512;
pub const ARENA_CHUNK_MAX: usize = 16 * 1024;

/// One buffered event: its frame, and the session's byte count after it
/// (for "how far behind" in bytes).
pub struct Buffered {
    pub frame: Frame,
    pub end: u64,
}

#[derive(Default)]
pub struct ReplayBuffer {
    /// Seq of `slots.front()`.
    first_seq: u64,
    slots: VecDeque<Buffered>,
    /// From which seq on the events were read from the provider when (the
    /// registry's own events: `None`), oldest first; the first entry may
    /// start before `first_seq`.
    read_at: VecDeque<(u64, Option<Instant>)>,
    /// Frame bytes buffered.
    bytes: usize,
    /// Bytes ever buffered for the session.
    total: u64,
    /// The chunk small frames are copied into; what it holds beyond its
    /// length is the room left.
    chunk: BytesMut,
    /// Capacity of the next chunk.
    next_chunk: usize,
    /// Events from this seq on are kept beyond the bounds (up to the stretch).
    floor: Option<u64>,
}

impl ReplayBuffer {
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Frame bytes buffered.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Bytes ever buffered for the session (survives [`clear`](Self::clear)).
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Seq of the oldest buffered event.
    pub fn front_seq(&self) -> Option<u64> {
        (!self.slots.is_empty()).then_some(self.first_seq)
    }

    /// Seq of the event at `index`.
    pub fn seq(&self, index: usize) -> u64 {
        self.first_seq + index as u64
    }

    /// When the event at `index` was read from the provider.
    pub fn read_at(&self, index: usize) -> Option<Instant> {
        let seq = self.seq(index);
        let after = self.read_at.partition_point(|(from, _)| *from <= seq);
        after.checked_sub(1).and_then(|i| self.read_at[i].1)
    }

    /// Clones of the frames at `range` (one delivery).
    pub fn frames(&self, range: std::ops::Range<usize>) -> Arc<[Frame]> {
        self.slots.range(range).map(|b| b.frame.clone()).collect()
    }

    /// The frames after seq `sent`, oldest first.
    pub fn frames_after(&self, sent: u64) -> impl Iterator<Item = &Frame> {
        let skip = sent.saturating_add(1).saturating_sub(self.first_seq);
        self.slots
            .iter()
            .skip(usize::try_from(skip).unwrap_or(usize::MAX))
            .map(|b| &b.frame)
    }

    /// Index of the first event that ends after `written` bytes.
    pub fn first_ending_after(&self, written: u64) -> usize {
        self.slots.partition_point(|b| b.end <= written)
    }

    /// Appends the event `seq` (the next after the newest; any seq when
    /// empty) and drops the oldest beyond the bounds. Returns the frame as
    /// kept (a clone shares its bytes).
    pub fn push(&mut self, seq: u64, frame: Frame, read_at: Option<Instant>) -> Frame {
        let frame = self.keep(frame);
        self.append(seq, frame, read_at)
    }

    /// [`push`](Self::push) of a frame of `len` bytes that `write` writes:
    /// a small one straight into the current chunk (not built on its own
    /// to be copied there).
    pub fn push_written(
        &mut self,
        seq: u64,
        len: usize,
        read_at: Option<Instant>,
        write: impl FnOnce(&mut FrameWriter),
    ) -> Frame {
        let frame = if len > ARENA_MAX_FRAME || len == 0 {
            let mut own = FrameWriter(BytesMut::with_capacity(len));
            write(&mut own);
            own.finish()
        } else {
            self.write_small(len, write)
        };
        self.append(seq, frame, read_at)
    }

    fn append(&mut self, seq: u64, frame: Frame, read_at: Option<Instant>) -> Frame {
        if self.slots.is_empty() {
            self.first_seq = seq;
            self.read_at.clear();
        }
        debug_assert_eq!(seq, self.first_seq + self.slots.len() as u64);
        if self.read_at.back().is_none_or(|(_, at)| *at != read_at) {
            self.read_at.push_back((seq, read_at));
        }
        self.bytes += frame.len();
        self.total += frame.len() as u64;
        self.slots.push_back(Buffered {
            frame: frame.clone(),
            end: self.total,
        });
        while self.over_bounds() {
            self.pop_front();
        }
        frame
    }

    /// Keeps the events from seq `floor` on beyond the bounds, up to the
    /// stretch (`None`: no longer); what a lower floor or none no longer
    /// keeps is dropped now.
    pub fn keep_from(&mut self, floor: Option<u64>) {
        self.floor = floor;
        while self.over_bounds() {
            self.pop_front();
        }
    }

    /// The oldest event is one too many: over the bounds and before the
    /// floor, or over the stretched bounds.
    fn over_bounds(&self) -> bool {
        let (events, bytes) = (self.slots.len(), self.bytes);
        let over = |max_events, max_bytes| events > max_events || (bytes > max_bytes && events > 1);
        if !over(REPLAY_MAX_EVENTS, REPLAY_MAX_BYTES) {
            return false;
        }
        match self.floor {
            Some(floor) if self.first_seq >= floor => over(
                REPLAY_MAX_EVENTS + REPLAY_STRETCH_EVENTS,
                REPLAY_MAX_BYTES + REPLAY_STRETCH_BYTES,
            ),
            _ => true,
        }
    }

    /// Drops the events before seq `keep_from`.
    pub fn drop_before(&mut self, keep_from: u64) {
        while self.front_seq().is_some_and(|s| s < keep_from) {
            self.pop_front();
        }
    }

    /// Drops every event (the byte count goes on).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.read_at.clear();
        self.bytes = 0;
        // An idle session keeps no chunk.
        self.chunk = BytesMut::new();
        self.next_chunk = 0;
    }

    fn pop_front(&mut self) {
        let Some(old) = self.slots.pop_front() else {
            return;
        };
        self.bytes -= old.frame.len();
        self.first_seq += 1;
        while self
            .read_at
            .get(1)
            .is_some_and(|(from, _)| *from <= self.first_seq)
        {
            self.read_at.pop_front();
        }
    }

    /// The frame as stored: a small one copied into the current chunk (a
    /// new chunk when it does not fit), a large one as it is.
    fn keep(&mut self, frame: Frame) -> Frame {
        let len = frame.len();
        if len > ARENA_MAX_FRAME || len == 0 {
            return frame;
        }
        self.write_small(len, |w| w.push_str(&frame))
    }

    /// A frame of `len` bytes written into the current chunk (a new chunk
    /// when they do not fit). The chunk's length is 0 between frames: each
    /// frame's bytes are split off as soon as they are written.
    fn write_small(&mut self, len: usize, write: impl FnOnce(&mut FrameWriter)) -> Frame {
        debug_assert!(self.chunk.is_empty());
        if self.chunk.capacity() < len {
            let size = self.next_chunk.clamp(ARENA_CHUNK_MIN, ARENA_CHUNK_MAX);
            self.next_chunk = (size * 2).min(ARENA_CHUNK_MAX);
            self.chunk = BytesMut::with_capacity(size.max(len));
        }
        let mut writer = FrameWriter(std::mem::take(&mut self.chunk));
        write(&mut writer);
        self.chunk = writer.0;
        FrameWriter(self.chunk.split()).finish()
    }
}

/// Bytes of frames being written: only `str`s go in, so what it holds is
/// UTF-8 (and becomes a frame without checking that again).
pub struct FrameWriter(BytesMut);

impl FrameWriter {
    pub fn push_str(&mut self, s: &str) {
        self.0.extend_from_slice(s.as_bytes());
    }

    fn finish(self) -> Frame {
        // SAFETY: a `FrameWriter` starts empty (a new `BytesMut`, or the
        // chunk, empty between frames) or is what `split` took of a chunk
        // holding only what one writer pushed; `push_str` is the only way
        // bytes get in, and `str`s joined are UTF-8.
        unsafe { ByteString::from_bytes_unchecked(self.0.freeze()) }
    }
}

impl std::ops::Index<usize> for ReplayBuffer {
    type Output = Buffered;

    fn index(&self, index: usize) -> &Buffered {
        &self.slots[index]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize, fill: char) -> Frame {
        Frame::from(fill.to_string().repeat(n))
    }

    #[test]
    fn seqs_are_implied_and_frames_kept_byte_for_byte() {
        let mut buf = ReplayBuffer::default();
        let big = frame(ARENA_MAX_FRAME + 1, 'b');
        for seq in 10..20 {
            let f = if seq == 15 {
                big.clone()
            } else {
                frame(100 + seq as usize, 'a')
            };
            let kept = buf.push(seq, f.clone(), None);
            assert_eq!(kept, f);
        }
        assert_eq!(buf.front_seq(), Some(10));
        assert_eq!(buf.seq(9), 19);
        assert_eq!(buf.frames(5..6)[0], big);
        // A large frame is kept as it came, not copied.
        assert_eq!(buf.frames(5..6)[0].as_ptr(), big.as_ptr());
        let lens: Vec<usize> = buf.frames_after(16).map(|f| f.len()).collect();
        assert_eq!(lens, vec![117, 118, 119]);
        assert_eq!(buf.frames_after(19).count(), 0);
        assert_eq!(buf.frames_after(0).count(), 10);
        let total: u64 = (10..20)
            .map(|s| if s == 15 { big.len() } else { 100 + s } as u64)
            .sum();
        assert_eq!(buf.total_bytes(), total);
        assert_eq!(buf.bytes() as u64, total);
        assert_eq!(buf[9].end, total);
        buf.drop_before(13);
        assert_eq!(buf.front_seq(), Some(13));
        assert_eq!(buf.len(), 7);
        assert_eq!(buf.first_ending_after(buf[0].end), 1);
        buf.clear();
        assert!(buf.is_empty());
        assert_eq!(buf.total_bytes(), total);
        buf.push(40, frame(10, 'c'), None);
        assert_eq!(buf.front_seq(), Some(40));
    }

    #[test]
    fn small_frames_share_chunks_that_grow_to_the_maximum() {
        let mut buf = ReplayBuffer::default();
        for seq in 1..=2000 {
            buf.push(seq, frame(300, 'x'), None);
        }
        let frames = buf.frames(0..2000);
        let mut chunks = 0;
        let mut largest = 0;
        let mut run = 1;
        for pair in frames.windows(2) {
            // Frames cut from one chunk lie back to back.
            if pair[0].as_ptr().wrapping_add(300) == pair[1].as_ptr() {
                run += 1;
            } else {
                chunks += 1;
                largest = largest.max(run);
                run = 1;
            }
        }
        largest = largest.max(run);
        assert_eq!(largest, ARENA_CHUNK_MAX / 300);
        // 0.5, 1, 2, 4, 8 KiB, then 16 KiB chunks: 5 + 600,000 / 16 KiB.
        assert!(chunks < 50, "{chunks} chunks");
    }

    #[test]
    fn the_bounds_drop_the_oldest() {
        let mut buf = ReplayBuffer::default();
        for seq in 1..=(REPLAY_MAX_EVENTS as u64 + 5) {
            buf.push(seq, frame(10, 'x'), None);
        }
        assert_eq!(buf.len(), REPLAY_MAX_EVENTS);
        assert_eq!(buf.front_seq(), Some(6));
        let mut buf = ReplayBuffer::default();
        let size = 1024 * 1024;
        for seq in 1..=40 {
            buf.push(seq, frame(size, 'y'), None);
        }
        assert_eq!(buf.len(), REPLAY_MAX_BYTES / size);
        assert_eq!(buf.bytes(), REPLAY_MAX_BYTES);
        // One frame above the byte bound is still kept.
        buf.push(41, frame(REPLAY_MAX_BYTES + 1, 'z'), None);
        assert_eq!(buf.len(), 1);
        assert_eq!(buf.front_seq(), Some(41));
    }

    #[test]
    fn a_floor_keeps_its_events_up_to_the_stretch() {
        let mut buf = ReplayBuffer::default();
        let max = REPLAY_MAX_EVENTS as u64;
        for seq in 1..=max {
            buf.push(seq, frame(10, 'x'), None);
        }
        // Kept from 101 on: the 100 before it go, then nothing more while
        // within the stretch.
        buf.keep_from(Some(101));
        let stretch = REPLAY_STRETCH_EVENTS as u64;
        for seq in max + 1..=max + 100 + stretch {
            buf.push(seq, frame(10, 'x'), None);
        }
        assert_eq!(buf.front_seq(), Some(101));
        assert_eq!(buf.len(), REPLAY_MAX_EVENTS + REPLAY_STRETCH_EVENTS);
        // Past the stretch the floor's events are dropped as any others.
        buf.push(max + 101 + stretch, frame(10, 'x'), None);
        assert_eq!(buf.front_seq(), Some(102));
        // A floor lifted: back within the bounds at once.
        buf.keep_from(None);
        assert_eq!(buf.len(), REPLAY_MAX_EVENTS);
        assert_eq!(buf.seq(buf.len() - 1), max + 101 + stretch);
        // Bytes too: a floor keeps at most the stretch's bytes more.
        let mut buf = ReplayBuffer::default();
        let size = 1024 * 1024;
        buf.keep_from(Some(1));
        for seq in 1..=80 {
            buf.push(seq, frame(size, 'y'), None);
        }
        assert_eq!(buf.bytes(), REPLAY_MAX_BYTES + REPLAY_STRETCH_BYTES);
    }

    #[test]
    fn read_times_are_kept_per_run_of_events() {
        let mut buf = ReplayBuffer::default();
        let (a, b) = (
            Instant::now(),
            Instant::now() + std::time::Duration::from_secs(1),
        );
        for seq in 1..=3 {
            buf.push(seq, frame(10, 'x'), Some(a));
        }
        buf.push(4, frame(10, 'x'), None);
        for seq in 5..=6 {
            buf.push(seq, frame(10, 'x'), Some(b));
        }
        let at: Vec<Option<Instant>> = (0..6).map(|i| buf.read_at(i)).collect();
        assert_eq!(at, vec![Some(a), Some(a), Some(a), None, Some(b), Some(b)]);
        assert_eq!(buf.read_at.len(), 3);
        buf.drop_before(3);
        assert_eq!(buf.read_at(0), Some(a));
        buf.drop_before(5);
        assert_eq!(buf.read_at.len(), 1);
        assert_eq!(buf.read_at(0), Some(b));
    }
}

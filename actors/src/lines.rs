//! Bounded line reading of a child's output (provider stdout and stderr,
//! plugin stdout and stderr): one line never takes more than its limit in
//! memory, whatever the child writes, and bytes are bytes (the caller
//! decides how to decode them), so neither a line without a newline nor
//! invalid UTF-8 stops a reader before EOF.

use std::io;

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// Reads one line of at most `max` bytes into `buf`, its newline included
/// when it fits (the rest of a longer line is consumed and dropped). Returns
/// the bytes consumed: 0 at EOF, more than `buf` grew by when the line was
/// cut.
pub async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<usize> {
    let mut consumed = 0;
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(consumed);
        }
        let (take, done) = match memchr::memchr(b'\n', chunk) {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let room = max.saturating_sub(buf.len()).min(take);
        let piece = chunk.get(..room).unwrap_or_default();
        if buf.capacity() - buf.len() < piece.len() {
            // A quarter more at a time, not double: a hundred runs ending
            // together each read a final line of the whole text (150 KB
            // in `chat-many`), which doubling left in 256 KB.
            buf.reserve_exact(piece.len().max(buf.len() / 4));
        }
        buf.extend_from_slice(piece);
        reader.consume(take);
        consumed += take;
        if done {
            return Ok(consumed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::BufReader;

    #[tokio::test]
    async fn lines_are_cut_at_the_limit_and_reading_goes_on() {
        let input: &[u8] = b"short\n0123456789abcdef\n\xff\xfe\nlast";
        let mut reader = BufReader::with_capacity(4, input);
        let mut buf = Vec::new();
        let mut lines = Vec::new();
        loop {
            buf.clear();
            let n = read_line_bounded(&mut reader, &mut buf, 10).await.unwrap();
            if n == 0 {
                break;
            }
            lines.push((buf.clone(), n > buf.len()));
        }
        assert_eq!(
            lines,
            [
                (b"short\n".to_vec(), false),
                (b"0123456789".to_vec(), true),
                (b"\xff\xfe\n".to_vec(), false),
                (b"last".to_vec(), false),
            ]
        );
    }

    #[tokio::test]
    async fn long_lines_are_cut_not_buffered() {
        let input = format!("{}\nshort\nlast", "x".repeat(100));
        let mut reader = BufReader::with_capacity(7, input.as_bytes());
        let mut buf = Vec::new();
        assert_eq!(
            read_line_bounded(&mut reader, &mut buf, 10).await.unwrap(),
            101
        );
        assert_eq!(buf, b"xxxxxxxxxx");
        buf.clear();
        read_line_bounded(&mut reader, &mut buf, 10).await.unwrap();
        assert_eq!(buf, b"short\n");
        buf.clear();
        assert_eq!(
            read_line_bounded(&mut reader, &mut buf, 10).await.unwrap(),
            4
        );
        assert_eq!(buf, b"last");
        buf.clear();
        assert_eq!(
            read_line_bounded(&mut reader, &mut buf, 10).await.unwrap(),
            0
        );
    }
}

//! One JSON object per line over a Unix stream socket, with the peer
//! untrusted: every write and every wait for a line has a deadline, a line
//! longer than the cap is discarded up to its newline and counted, and one
//! non-blocking poll reads at most a fixed number of bytes, so a peer that
//! floods costs a bounded amount of memory and time.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The longest line either protocol accepts.
pub const DEFAULT_MAX_LINE_BYTES: usize = 64 * 1024;
/// Bytes one `poll` reads at most; the rest waits in the socket.
pub const DEFAULT_MAX_READ_BYTES: usize = 1024 * 1024;
/// Complete lines kept unread at most; older ones are dropped and counted.
const MAX_READY_LINES: usize = 64;
/// Bytes asked of the socket per read call.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Caps of one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_line_bytes: usize,
    pub max_read_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            max_read_bytes: DEFAULT_MAX_READ_BYTES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("connecting to {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} closed the connection")]
    Closed { path: String },
    #[error("{path} sent no complete line within {waited:?}")]
    ReadTimeout { path: String, waited: Duration },
    #[error("{path} sent more than {bytes} bytes without a complete line")]
    ReadCap { path: String, bytes: usize },
    #[error("{path} did not take a {bytes}-byte line within {waited:?}")]
    WriteTimeout {
        path: String,
        bytes: usize,
        waited: Duration,
    },
}

/// What a peer's lines have cost, by kind; they only grow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineCounters {
    /// Lines longer than the cap, discarded up to their newline.
    pub oversized_lines: u64,
    /// Polls that stopped at the read cap with more data waiting.
    pub read_cap_reached: u64,
    /// Complete lines dropped because too many were waiting unread.
    pub dropped_lines: u64,
}

/// One piece of a peer's byte stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    /// A complete line within the cap, without its newline.
    Line(Vec<u8>),
    /// A line went over the cap: what came of it is dropped, and so is the
    /// rest of it up to its newline, which is never taken for a new line.
    Oversized,
}

/// Splits a byte stream into lines of at most `max_line_bytes`.
#[derive(Clone, Debug)]
pub struct LineSplitter {
    max_line_bytes: usize,
    partial: Vec<u8>,
    /// Inside an oversized line: drop everything up to the next newline.
    discarding: bool,
}

impl LineSplitter {
    pub fn new(max_line_bytes: usize) -> Self {
        LineSplitter {
            max_line_bytes,
            partial: Vec::new(),
            discarding: false,
        }
    }

    /// Takes in received bytes; returns the pieces they complete, in order.
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<Piece> {
        let mut pieces = Vec::new();
        while !bytes.is_empty() {
            let newline = bytes.iter().position(|b| *b == b'\n');
            if self.discarding {
                match newline {
                    Some(at) => {
                        self.discarding = false;
                        bytes = bytes.get(at + 1..).unwrap_or_default();
                        continue;
                    }
                    None => break,
                }
            }
            let (head, rest, complete) = match newline {
                Some(at) => (
                    bytes.get(..at).unwrap_or_default(),
                    bytes.get(at + 1..).unwrap_or_default(),
                    true,
                ),
                None => (bytes, &[][..], false),
            };
            if self.partial.len().saturating_add(head.len()) > self.max_line_bytes {
                pieces.push(Piece::Oversized);
                self.partial.clear();
                self.discarding = !complete;
            } else {
                self.partial.extend_from_slice(head);
                if complete {
                    pieces.push(Piece::Line(std::mem::take(&mut self.partial)));
                }
            }
            bytes = rest;
        }
        pieces
    }
}

/// A line-oriented connection to one untrusted peer.
pub struct LineConnection {
    path: String,
    stream: UnixStream,
    limits: Limits,
    splitter: LineSplitter,
    ready: VecDeque<Vec<u8>>,
    counters: LineCounters,
    /// Reused for every read, so polling allocates nothing per call.
    chunk: Vec<u8>,
}

fn is_timeout(error: &std::io::Error) -> bool {
    matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

impl LineConnection {
    pub fn connect(path: &Path, limits: Limits) -> Result<Self, LineError> {
        let shown = path.display().to_string();
        let stream = UnixStream::connect(path).map_err(|source| LineError::Connect {
            path: shown.clone(),
            source,
        })?;
        Ok(Self::from_stream(&shown, stream, limits))
    }

    /// Wraps a connected stream (tests hand in one end of a socketpair).
    pub fn from_stream(path: &str, stream: UnixStream, limits: Limits) -> Self {
        LineConnection {
            path: path.to_string(),
            stream,
            limits,
            splitter: LineSplitter::new(limits.max_line_bytes),
            ready: VecDeque::new(),
            counters: LineCounters::default(),
            chunk: vec![0u8; READ_CHUNK_BYTES],
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn counters(&self) -> LineCounters {
        self.counters
    }

    fn io(&self, source: std::io::Error) -> LineError {
        LineError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Writes `line` and a newline, failing if the peer has not taken it all
    /// by `deadline`. After a failure the connection is unusable: part of
    /// the line may have gone out.
    pub fn send(&mut self, line: &[u8], deadline: Instant) -> Result<(), LineError> {
        let started = Instant::now();
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line);
        bytes.push(b'\n');
        let mut written = 0;
        while written < bytes.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = || LineError::WriteTimeout {
                path: self.path.clone(),
                bytes: bytes.len(),
                waited: started.elapsed(),
            };
            if left.is_zero() {
                return Err(timeout());
            }
            self.stream
                .set_nonblocking(false)
                .and_then(|()| self.stream.set_write_timeout(Some(left)))
                .map_err(|e| self.io(e))?;
            match self.stream.write(bytes.get(written..).unwrap_or_default()) {
                Ok(0) => {
                    return Err(LineError::Closed {
                        path: self.path.clone(),
                    })
                }
                Ok(n) => written += n,
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(error) if is_timeout(&error) => return Err(timeout()),
                Err(error) if error.kind() == ErrorKind::BrokenPipe => {
                    return Err(LineError::Closed {
                        path: self.path.clone(),
                    })
                }
                Err(error) => return Err(self.io(error)),
            }
        }
        Ok(())
    }

    /// Splits received bytes into lines, enforcing the line cap.
    fn ingest(&mut self, bytes: &[u8]) {
        for piece in self.splitter.push(bytes) {
            match piece {
                Piece::Line(line) => {
                    if self.ready.len() == MAX_READY_LINES {
                        self.ready.pop_front();
                        self.counters.dropped_lines += 1;
                    }
                    self.ready.push_back(line);
                }
                Piece::Oversized => self.counters.oversized_lines += 1,
            }
        }
    }

    /// Reads once, waiting at most `wait` (`None`: not at all). Returns the
    /// number of bytes read.
    /// One read of at most `max_bytes` (the rest of the read cap), waiting
    /// up to `wait` (None: only what is there now).
    fn read_once(&mut self, wait: Option<Duration>, max_bytes: usize) -> Result<usize, LineError> {
        match wait {
            None => self.stream.set_nonblocking(true),
            Some(wait) => self.stream.set_nonblocking(false).and_then(|()| {
                self.stream
                    .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            }),
        }
        .map_err(|e| self.io(e))?;
        let mut chunk = std::mem::take(&mut self.chunk);
        let len = chunk.len().min(max_bytes.max(1));
        let outcome = self.read_into(chunk.get_mut(..len).unwrap_or_default());
        self.chunk = chunk;
        outcome
    }

    fn read_into(&mut self, chunk: &mut [u8]) -> Result<usize, LineError> {
        loop {
            match self.stream.read(chunk) {
                Ok(0) => {
                    return Err(LineError::Closed {
                        path: self.path.clone(),
                    })
                }
                Ok(n) => {
                    self.ingest(chunk.get(..n).unwrap_or_default());
                    return Ok(n);
                }
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(error) if is_timeout(&error) => return Ok(0),
                Err(error) => return Err(self.io(error)),
            }
        }
    }

    /// Takes in what has arrived without waiting, at most the read cap, and
    /// returns every complete line received so far.
    pub fn poll(&mut self) -> Result<Vec<Vec<u8>>, LineError> {
        let mut read = 0usize;
        // Lines are handed out as they complete: the read cap, not the
        // queue of unread lines, bounds what one poll holds.
        let mut lines: Vec<Vec<u8>> = self.ready.drain(..).collect();
        loop {
            if read >= self.limits.max_read_bytes {
                self.counters.read_cap_reached += 1;
                return Ok(lines);
            }
            let outcome = self.read_once(None, self.limits.max_read_bytes - read);
            lines.extend(self.ready.drain(..));
            match outcome {
                Ok(0) => return Ok(lines),
                Ok(n) => read = read.saturating_add(n),
                Err(error) => return Err(error),
            }
        }
    }

    /// The next complete line, waiting until `deadline` and reading the
    /// read cap at most.
    pub fn next_line(&mut self, deadline: Instant) -> Result<Vec<u8>, LineError> {
        let started = Instant::now();
        let mut read = 0usize;
        loop {
            if let Some(line) = self.ready.pop_front() {
                return Ok(line);
            }
            if read >= self.limits.max_read_bytes {
                self.counters.read_cap_reached += 1;
                return Err(LineError::ReadCap {
                    path: self.path.clone(),
                    bytes: self.limits.max_read_bytes,
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // A common deadline may have passed while other peers were
                // waited for: take what this peer already sent.
                let n = self.read_once(None, self.limits.max_read_bytes.saturating_sub(read))?;
                if n > 0 && read < self.limits.max_read_bytes {
                    read = read.saturating_add(n);
                    continue;
                }
                if let Some(line) = self.ready.pop_front() {
                    return Ok(line);
                }
                return Err(LineError::ReadTimeout {
                    path: self.path.clone(),
                    waited: started.elapsed(),
                });
            }
            let rest = self.limits.max_read_bytes - read;
            read = read.saturating_add(self.read_once(Some(left), rest)?);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pair(limits: Limits) -> (LineConnection, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        (LineConnection::from_stream("peer", ours, limits), theirs)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn lines_arrive_whole_across_reads() {
        let (mut conn, mut peer) = pair(Limits::default());
        peer.write_all(b"{\"a\":").unwrap();
        assert!(conn.poll().unwrap().is_empty());
        peer.write_all(b"1}\n{\"b\":2}\n{\"c\"").unwrap();
        assert_eq!(conn.next_line(soon()).unwrap(), b"{\"a\":1}".to_vec());
        assert_eq!(conn.poll().unwrap(), vec![b"{\"b\":2}".to_vec()]);
    }

    #[test]
    fn an_oversized_line_is_dropped_to_its_newline_and_counted() {
        let limits = Limits {
            max_line_bytes: 16,
            max_read_bytes: 1 << 20,
        };
        let (mut conn, mut peer) = pair(limits);
        peer.write_all(&[b'x'; 40]).unwrap();
        assert!(conn.poll().unwrap().is_empty());
        // The tail of the long line is not taken for a new line.
        peer.write_all(b"tail-of-long\nnext\n").unwrap();
        assert_eq!(conn.poll().unwrap(), vec![b"next".to_vec()]);
        assert_eq!(conn.counters().oversized_lines, 1);
        // Over the cap within one read, with its newline.
        peer.write_all(&[b'y'; 17]).unwrap();
        peer.write_all(b"\nok\n").unwrap();
        assert_eq!(conn.poll().unwrap(), vec![b"ok".to_vec()]);
        assert_eq!(conn.counters().oversized_lines, 2);
    }

    #[test]
    fn a_poll_reads_at_most_the_cap() {
        let limits = Limits {
            max_line_bytes: 1024,
            max_read_bytes: 64 * 1024,
        };
        let (mut conn, peer) = pair(limits);
        let writer = std::thread::spawn(move || {
            let mut peer = peer;
            let line = [b'z'; 100];
            // 1 MiB of short lines; stops when the reader goes away.
            for _ in 0..10_000 {
                if peer
                    .write_all(&line)
                    .and_then(|()| peer.write_all(b"\n"))
                    .is_err()
                {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while conn.counters().read_cap_reached == 0 {
            assert!(Instant::now() < deadline, "the cap was never reached");
            let lines = conn.poll().unwrap();
            // 101-byte lines, at most the read cap of them.
            assert!(lines.len() <= 64 * 1024 / 101 + 1, "{}", lines.len());
        }
        drop(conn);
        writer.join().unwrap();
    }

    #[test]
    fn a_silent_peer_costs_the_deadline_and_no_more() {
        let (mut conn, _peer) = pair(Limits::default());
        let started = Instant::now();
        let error = conn
            .next_line(Instant::now() + Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(error, LineError::ReadTimeout { .. }), "{error}");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
    }

    #[test]
    fn a_reply_already_there_is_taken_after_the_deadline() {
        let (mut conn, mut peer) = pair(Limits::default());
        peer.write_all(b"{\"late\":false}\n").unwrap();
        let line = conn
            .next_line(Instant::now() - Duration::from_secs(1))
            .unwrap();
        assert_eq!(line, b"{\"late\":false}".to_vec());
    }

    #[test]
    fn a_peer_that_never_reads_costs_the_write_deadline() {
        let (mut conn, _peer) = pair(Limits::default());
        let big = vec![b'w'; 16 << 20];
        let error = conn
            .send(&big, Instant::now() + Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(error, LineError::WriteTimeout { .. }), "{error}");
    }

    #[test]
    fn a_flood_without_newlines_costs_the_read_cap() {
        let limits = Limits {
            max_line_bytes: 1024,
            max_read_bytes: 256 * 1024,
        };
        let (mut conn, peer) = pair(limits);
        let flood = std::thread::spawn(move || {
            let mut peer = peer;
            let chunk = vec![b'f'; 64 * 1024];
            while peer.write_all(&chunk).is_ok() {}
        });
        let error = conn.next_line(soon()).unwrap_err();
        assert!(matches!(error, LineError::ReadCap { .. }), "{error}");
        assert_eq!(conn.counters().read_cap_reached, 1);
        assert_eq!(conn.counters().oversized_lines, 1);
        drop(conn);
        flood.join().unwrap();
    }

    #[test]
    fn a_closed_peer_is_an_error() {
        let (mut conn, peer) = pair(Limits::default());
        drop(peer);
        assert!(matches!(conn.poll(), Err(LineError::Closed { .. })));
        assert!(matches!(
            conn.send(b"{}", soon()),
            Err(LineError::Closed { .. })
        ));
    }

    proptest! {
        /// Whatever the bytes and however they are split, every returned
        /// line is within the cap and equals a newline-separated piece of
        /// the input that was within the cap.
        #[test]
        fn lines_are_the_short_pieces_of_the_input(
            input in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'a'), any::<u8>()], 0..400),
            cut in 1usize..50,
        ) {
            let limits = Limits { max_line_bytes: 20, max_read_bytes: 1 << 20 };
            let (mut conn, _peer) = pair(limits);
            for chunk in input.chunks(cut) {
                conn.ingest(chunk);
            }
            let got: Vec<Vec<u8>> = conn.ready.drain(..).collect();
            let mut pieces: Vec<&[u8]> = input.split(|b| *b == b'\n').collect();
            pieces.pop(); // the unterminated tail is not a line yet
            let expected: Vec<Vec<u8>> = pieces
                .into_iter()
                .filter(|p| p.len() <= 20)
                .map(<[u8]>::to_vec)
                .collect();
            let oversized = input
                .split(|b| *b == b'\n')
                .take(input.iter().filter(|b| **b == b'\n').count())
                .filter(|p| p.len() > 20)
                .count() as u64;
            // The ready queue keeps the newest MAX_READY_LINES lines.
            let keep = expected.len().min(MAX_READY_LINES);
            prop_assert_eq!(&got[..], &expected[expected.len() - keep..]);
            prop_assert!(conn.counters().oversized_lines >= oversized);
        }
    }
}

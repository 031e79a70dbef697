//! Joining adjacent reads and writes into one submission entry.
//!
//! The reads and writes started in one turn of the loop go to the kernel at its end, sorted
//! (reads first, then by file and offset); each run of adjacent ones of the same kind goes as one vectored
//! entry. Fewer entries mean fewer block-layer requests, and for writes into space the file
//! system has not written yet (a growing image's fresh clusters), one conversion of
//! unwritten extents instead of one per op: sequential 8 KiB writes into a growing image at
//! depth 16 went from 0.73x to 0.91x (and 0.66x to 1.05x in a second run) of an overwritten
//! raw file's (BENCHMARKS.md).
//!
//! Only a turn that takes in several commands has anything to join; the hub holds commands
//! for the reaper's next turn while the stream is [`sequential`](Stream::sequential)
//! (`hub.rs`), so random requests are never held.

/// The most bytes one entry moves (below every block device's request size limit).
const MAX_BYTES: usize = 1 << 20;
/// The most iovecs one entry joins (`IOV_MAX` is 1024).
const MAX_IOVS: usize = 256;

/// A read or write as the joining sees it. The field order is the sort order: reads go
/// first (a request usually waits for its reads, and a write into space not yet written
/// may take long to issue; a copy-on-write's read behind it waited as long).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Span {
    pub(crate) write: bool,
    /// Registered index of the file.
    pub(crate) file: u32,
    pub(crate) offset: u64,
    pub(crate) len: usize,
    pub(crate) iovs: usize,
}

impl Span {
    fn end(&self) -> u64 {
        self.offset + self.len as u64
    }
}

/// How many of `items` (sorted by their spans) from the first one go as one entry: the
/// run of the first one's kind and file, each starting where the one before ended, within
/// the limits.
pub(crate) fn run_len<T>(items: &[T], span: impl Fn(&T) -> Span) -> usize {
    let Some((first, rest)) = items.split_first() else {
        return 0;
    };
    let first = span(first);
    let (mut end, mut bytes, mut iovs) = (first.end(), first.len, first.iovs);
    1 + rest
        .iter()
        .map(span)
        .take_while(|s| {
            let next = (s.write, s.file, s.offset) == (first.write, first.file, end)
                && bytes + s.len <= MAX_BYTES
                && iovs + s.iovs <= MAX_IOVS;
            if next {
                (end, bytes, iovs) = (s.end(), bytes + s.len, iovs + s.iovs);
            }
            next
        })
        .count()
}

/// The score from which the stream counts as sequential, and its ceiling.
const SEQ_ON: u8 = 8;
const SEQ_MAX: u8 = 16;

/// How sequential the reads and writes lately submitted were: up one for each that started
/// where the last of its kind ended, down one for each that did not.
#[derive(Debug)]
pub(crate) struct Stream {
    /// Where the last read and the last write ended.
    last_end: [u64; 2],
    score: u8,
}

impl Default for Stream {
    fn default() -> Self {
        Self {
            last_end: [u64::MAX; 2],
            score: 0,
        }
    }
}

impl Stream {
    /// Takes note of a read or write submitted.
    pub(crate) fn note(&mut self, s: &Span) {
        let kind = usize::from(s.write);
        self.score = if s.offset == self.last_end[kind] {
            (self.score + 1).min(SEQ_MAX)
        } else {
            self.score.saturating_sub(1)
        };
        self.last_end[kind] = s.end();
    }

    /// Whether commands queued together are worth taking in together: their ops will
    /// likely join.
    pub(crate) fn sequential(&self) -> bool {
        self.score >= SEQ_ON
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(read: bool, offset: u64, len: usize) -> Span {
        Span {
            write: !read,
            file: 0,
            offset,
            len,
            iovs: 1,
        }
    }

    #[test]
    fn runs_are_adjacent_spans_of_one_kind_and_file() {
        let mut spans = [
            span(false, 16384, 8192),
            span(false, 0, 8192),
            span(false, 8192, 8192),
            span(false, 32768, 8192),
            span(true, 40960, 4096),
            span(true, 45056, 4096),
            Span {
                file: 1,
                ..span(true, 49152, 4096)
            },
        ];
        spans.sort_unstable();
        let mut runs = Vec::new();
        let mut rest = &spans[..];
        while !rest.is_empty() {
            let n = run_len(rest, |s| *s);
            runs.push((!rest[0].write, rest[0].offset, n));
            rest = &rest[n..];
        }
        // Reads first, of file 0, then file 1's; writes 0..24K, then 32K alone (a gap).
        assert_eq!(
            runs,
            [
                (true, 40960, 2),
                (true, 49152, 1),
                (false, 0, 3),
                (false, 32768, 1)
            ]
        );
    }

    #[test]
    fn runs_stop_at_the_limits() {
        let spans: Vec<_> = (0..300u64).map(|i| span(false, i * 4096, 4096)).collect();
        assert_eq!(run_len(&spans, |s| *s), MAX_IOVS, "iovecs");
        let spans: Vec<_> = (0..20u64).map(|i| span(false, i << 17, 1 << 17)).collect();
        assert_eq!(run_len(&spans, |s| *s), MAX_BYTES >> 17, "bytes");
        assert_eq!(run_len(&[], |s: &Span| *s), 0);
    }

    #[test]
    fn a_stream_turns_sequential_and_back() {
        let mut s = Stream::default();
        // (The first one follows nothing.)
        for i in 0..=SEQ_ON as u64 {
            assert!(!s.sequential(), "after {i}");
            s.note(&span(false, i * 8192, 8192));
        }
        assert!(s.sequential());
        // Reads elsewhere, interleaved with the write stream, are a stream of their own.
        for i in 0..4u64 {
            s.note(&span(true, (1 << 30) + i * 4096, 4096));
            s.note(&span(false, (SEQ_ON as u64 + 1 + i) * 8192, 8192));
        }
        assert!(s.sequential());
        for i in 0..SEQ_MAX as u64 {
            s.note(&span(false, i * 999_424, 8192));
        }
        assert!(!s.sequential(), "scattered requests end it");
    }
}

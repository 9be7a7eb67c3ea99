//! What the verifier prints: one line per event, each starting with
//! `@@VERIFY`, so that a host-side test can pick them out of a serial
//! console shared with other output. Formatting is pure; `Reporter` writes
//! the lines and looks up the guest-physical address of a bad word.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::words::WordMismatch;

/// Mismatch lines printed per pass at most; the rest are only counted (a
/// wholly zeroed 160 MiB would otherwise be 20 million lines on a serial
/// console). The pass line always carries the full count.
pub const MISMATCH_LINES_PER_PASS: u64 = 4096;

/// Where a bad word was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Region {
    /// One of the owned chunks, by index.
    Chunk(u64),
    /// The short-lived churn allocation.
    Churn,
    /// The memory of a deflate-on-OOM push (`--oom-push`).
    Push,
}

/// A word of memory that did not hold what was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMismatch {
    pub region: Region,
    pub generation: u64,
    pub pass: u64,
    pub word: WordMismatch,
}

/// `@@VERIFY MISMATCH addr=0x.. chunk=.. word=.. want=0x.. got=0x..`, then
/// the chunk's generation, the pass, and the guest-physical address when
/// the page map told it.
pub fn mismatch_line(mismatch: &MemoryMismatch, gpa: Option<u64>) -> String {
    let chunk = match mismatch.region {
        Region::Chunk(index) => index.to_string(),
        Region::Churn => "churn".to_string(),
        Region::Push => "push".to_string(),
    };
    let gpa = gpa.map_or_else(|| "?".to_string(), |gpa| format!("0x{gpa:x}"));
    let word = mismatch.word;
    format!(
        "@@VERIFY MISMATCH addr=0x{:x} chunk={chunk} word={} want=0x{:016x} got=0x{:016x} generation={} pass={} gpa={gpa}",
        word.addr, word.index, word.want, word.got, mismatch.generation, mismatch.pass
    )
}

/// A word of the page-cache file that did not read back as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheMismatch {
    pub path: PathBuf,
    pub round: u64,
    /// `cached` (read from the page cache) or `reread` (after dropping it).
    pub read: &'static str,
    pub offset: u64,
    pub want: u64,
    pub got: u64,
}

pub fn cache_mismatch_line(mismatch: &CacheMismatch) -> String {
    format!(
        "@@VERIFY CACHE-MISMATCH file={} round={} read={} offset=0x{:x} want=0x{:016x} got=0x{:016x}",
        mismatch.path.display(),
        mismatch.round,
        mismatch.read,
        mismatch.offset,
        mismatch.want,
        mismatch.got
    )
}

/// The physical address behind virtual address `addr`, from its
/// /proc/self/pagemap entry: bit 63 says the page is present, bits 0-54
/// hold the frame number (zero unless the reader has CAP_SYS_ADMIN).
pub fn physical_address(entry: u64, addr: usize) -> Option<u64> {
    const PRESENT: u64 = 1 << 63;
    const PFN_MASK: u64 = (1 << 55) - 1;
    let pfn = entry & PFN_MASK;
    if entry & PRESENT == 0 || pfn == 0 {
        return None;
    }
    let offset = u64::try_from(addr % PAGE_BYTES).ok()?;
    pfn.checked_mul(PAGE_BYTES as u64)?.checked_add(offset)
}

const PAGE_BYTES: usize = 4096;

/// Writes the lines; remembers the first write error (the caller checks
/// it after each pass) instead of failing in the middle of a verification.
pub struct Reporter<W: Write> {
    out: W,
    pagemap: Option<File>,
    lines_left: u64,
    unreported: u64,
    error: Option<std::io::Error>,
}

impl<W: Write> Reporter<W> {
    pub fn new(out: W) -> Self {
        Reporter {
            out,
            pagemap: File::open("/proc/self/pagemap").ok(),
            lines_left: MISMATCH_LINES_PER_PASS,
            unreported: 0,
            error: None,
        }
    }

    /// Writes one line and flushes it.
    pub fn line(&mut self, text: &str) {
        if self.error.is_some() {
            return;
        }
        let written = writeln!(self.out, "{text}").and_then(|()| self.out.flush());
        if let Err(error) = written {
            self.error = Some(error);
        }
    }

    /// A new pass: the per-pass cap on mismatch lines starts again.
    pub fn start_pass(&mut self) {
        self.lines_left = MISMATCH_LINES_PER_PASS;
    }

    pub fn memory_mismatch(&mut self, mismatch: &MemoryMismatch) {
        if self.lines_left == 0 {
            self.unreported = self.unreported.saturating_add(1);
            return;
        }
        self.lines_left -= 1;
        let gpa = self.physical(mismatch.word.addr);
        self.line(&mismatch_line(mismatch, gpa));
    }

    pub fn cache_mismatch(&mut self, mismatch: &CacheMismatch) {
        if self.lines_left == 0 {
            self.unreported = self.unreported.saturating_add(1);
            return;
        }
        self.lines_left -= 1;
        self.line(&cache_mismatch_line(mismatch));
    }

    /// Mismatches counted but not printed, since the start.
    pub fn unreported(&self) -> u64 {
        self.unreported
    }

    /// The first write error, if any.
    pub fn take_error(&mut self) -> Option<std::io::Error> {
        self.error.take()
    }

    fn physical(&self, addr: usize) -> Option<u64> {
        let pagemap = self.pagemap.as_ref()?;
        let offset = u64::try_from(addr / PAGE_BYTES).ok()?.checked_mul(8)?;
        let mut entry = [0u8; 8];
        pagemap.read_exact_at(&mut entry, offset).ok()?;
        physical_address(u64::from_le_bytes(entry), addr)
    }

    #[cfg(test)]
    pub fn into_inner(self) -> W {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mismatch(region: Region) -> MemoryMismatch {
        MemoryMismatch {
            region,
            generation: 3,
            pass: 16,
            word: WordMismatch {
                index: 5,
                addr: 0x7f00_0000_1028,
                want: 0x2602_081c_1e7a_4580,
                got: 0,
            },
        }
    }

    #[test]
    fn a_mismatch_line_names_address_chunk_word_want_and_got() {
        assert_eq!(
            mismatch_line(&mismatch(Region::Chunk(14)), Some(0x1234_5028)),
            "@@VERIFY MISMATCH addr=0x7f0000001028 chunk=14 word=5 want=0x2602081c1e7a4580 got=0x0000000000000000 generation=3 pass=16 gpa=0x12345028"
        );
        let churn = mismatch_line(&mismatch(Region::Churn), None);
        assert!(churn.contains(" chunk=churn "), "{churn}");
        assert!(churn.ends_with(" gpa=?"), "{churn}");
        let push = mismatch_line(&mismatch(Region::Push), None);
        assert!(push.contains(" chunk=push "), "{push}");
    }

    #[test]
    fn a_cache_mismatch_line_names_file_offset_want_and_got() {
        let line = cache_mismatch_line(&CacheMismatch {
            path: "/dev/vda".into(),
            round: 2,
            read: "reread",
            offset: 0x1000,
            want: 1,
            got: 0,
        });
        assert_eq!(
            line,
            "@@VERIFY CACHE-MISMATCH file=/dev/vda round=2 read=reread offset=0x1000 want=0x0000000000000001 got=0x0000000000000000"
        );
    }

    #[test]
    fn pagemap_entries_give_a_physical_address_only_when_present() {
        let present = (1u64 << 63) | 0x1234;
        assert_eq!(physical_address(present, 0x7000_0abc), Some(0x0123_4abc));
        assert_eq!(physical_address(0x1234, 0x7000_0abc), None, "not present");
        assert_eq!(physical_address(1 << 63, 0x7000_0abc), None, "PFN hidden");
        // Flag bits 55-62 are not part of the frame number.
        let flagged = present | (1 << 61) | (1 << 55);
        assert_eq!(physical_address(flagged, 0x10), Some(0x0123_4010));
    }

    #[test]
    fn mismatch_lines_are_capped_per_pass_and_the_rest_counted() {
        let mut reporter = Reporter::new(Vec::new());
        let total = MISMATCH_LINES_PER_PASS + 10;
        for _ in 0..total {
            reporter.memory_mismatch(&mismatch(Region::Chunk(1)));
        }
        assert_eq!(reporter.unreported(), 10);
        reporter.start_pass();
        reporter.memory_mismatch(&mismatch(Region::Chunk(1)));
        assert_eq!(reporter.unreported(), 10);
        let text = String::from_utf8(reporter.into_inner()).unwrap();
        let lines = text.lines().count() as u64;
        assert_eq!(lines, MISMATCH_LINES_PER_PASS + 1);
        assert!(text.lines().all(|l| l.starts_with("@@VERIFY MISMATCH ")));
    }

    #[test]
    fn a_write_error_is_kept_for_the_caller() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("console gone"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut reporter = Reporter::new(Broken);
        reporter.line("@@VERIFY x");
        reporter.line("@@VERIFY y");
        let error = reporter.take_error().map(|e| e.to_string());
        assert_eq!(error.as_deref(), Some("console gone"));
    }
}

//! Turning guest page frame numbers and reported ranges into validated,
//! coalesced runs of pages inside guest RAM. Pure functions: everything the
//! guest sends is checked here before any memory is touched.

/// The balloon's page size: PFNs are always in 4 KiB frames.
pub const PAGE_SIZE_BYTES: u64 = 4096;
const PAGE_SHIFT: u32 = 12;

/// One guest RAM region as the device sees it (guest physical addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    pub start_gpa: u64,
    pub size_bytes: u64,
}

impl RamRegion {
    fn pages(&self) -> u64 {
        self.size_bytes / PAGE_SIZE_BYTES
    }
}

/// Contiguous 4 KiB pages inside one region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRun {
    pub region: usize,
    pub first_page: u64,
    pub pages: u64,
}

/// Byte range inside one region (offset from the region's start).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRun {
    pub region: usize,
    pub offset_bytes: u64,
    pub len_bytes: u64,
}

/// The whole host pages of `host_page_bytes` inside a run of 4 KiB pages:
/// a reported range may start or end inside a huge page, and only whole
/// host pages can be freed. None when no whole host page is inside.
pub fn whole_host_pages(run: &PageRun, host_page_bytes: u64) -> Option<ByteRun> {
    let host_page_bytes = host_page_bytes.max(PAGE_SIZE_BYTES);
    let start = run
        .first_page
        .checked_mul(PAGE_SIZE_BYTES)?
        .checked_next_multiple_of(host_page_bytes)?;
    let end = run
        .first_page
        .checked_add(run.pages)?
        .checked_mul(PAGE_SIZE_BYTES)?;
    let end = end - end % host_page_bytes;
    (end > start).then(|| ByteRun {
        region: run.region,
        offset_bytes: start,
        len_bytes: end - start,
    })
}

/// The outcome of compacting one inflate or deflate request.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PfnBatch {
    pub runs: Vec<PageRun>,
    /// PFNs whose page is not wholly inside guest RAM (skipped).
    pub outside_ram: usize,
    /// PFNs that appeared more than once in the request (counted once).
    pub duplicates: usize,
}

/// Finds the region and page index of a guest physical page, if the whole
/// 4 KiB page lies inside one region.
fn locate_page(regions: &[RamRegion], gpa: u64) -> Option<(usize, u64)> {
    regions.iter().enumerate().find_map(|(index, region)| {
        let offset = gpa.checked_sub(region.start_gpa)?;
        let page = offset / PAGE_SIZE_BYTES;
        (offset % PAGE_SIZE_BYTES == 0 && page < region.pages()).then_some((index, page))
    })
}

/// Validates, sorts, dedupes and coalesces PFNs into runs of pages.
pub fn compact_pfns(regions: &[RamRegion], pfns: impl IntoIterator<Item = u32>) -> PfnBatch {
    let mut batch = PfnBatch::default();
    let mut located: Vec<(usize, u64)> = Vec::new();
    for pfn in pfns {
        match locate_page(regions, u64::from(pfn) << PAGE_SHIFT) {
            Some(place) => located.push(place),
            None => batch.outside_ram += 1,
        }
    }
    located.sort_unstable();
    let before = located.len();
    located.dedup();
    batch.duplicates = before - located.len();

    for (region, page) in located {
        match batch.runs.last_mut() {
            Some(run) if run.region == region && run.first_page + run.pages == page => {
                run.pages += 1
            }
            _ => batch.runs.push(PageRun {
                region,
                first_page: page,
                pages: 1,
            }),
        }
    }
    batch
}

/// Why a reported free range was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeError {
    Empty,
    Unaligned,
    /// The range starts outside guest RAM (in a hole or beyond the end).
    OutsideRam,
    /// The range starts in a region and runs past its end.
    CrossesRegionEnd,
}

/// Validates one reported free range (guest physical address and length):
/// it must be non-empty, page-aligned and wholly inside one region.
pub fn locate_range(
    regions: &[RamRegion],
    gpa: u64,
    len_bytes: u64,
) -> Result<PageRun, RangeError> {
    if len_bytes == 0 {
        return Err(RangeError::Empty);
    }
    if !gpa.is_multiple_of(PAGE_SIZE_BYTES) || !len_bytes.is_multiple_of(PAGE_SIZE_BYTES) {
        return Err(RangeError::Unaligned);
    }
    let (region, first_page) = locate_page(regions, gpa).ok_or(RangeError::OutsideRam)?;
    let pages = len_bytes / PAGE_SIZE_BYTES;
    let region_pages = regions.get(region).map_or(0, RamRegion::pages);
    if first_page
        .checked_add(pages)
        .is_none_or(|end| end > region_pages)
    {
        return Err(RangeError::CrossesRegionEnd);
    }
    Ok(PageRun {
        region,
        first_page,
        pages,
    })
}

/// Reads little-endian u32 PFNs from a request buffer. Returns the PFNs and
/// whether trailing bytes (a length that is not a multiple of 4) were left.
pub fn parse_pfns(bytes: &[u8]) -> (Vec<u32>, bool) {
    let chunks = bytes.chunks_exact(4);
    let trailing = !chunks.remainder().is_empty();
    let pfns = chunks
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (pfns, trailing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn two_regions() -> Vec<RamRegion> {
        vec![
            RamRegion {
                start_gpa: 0,
                size_bytes: 0xa0000,
            },
            RamRegion {
                start_gpa: 0x100000,
                size_bytes: 0x400000,
            },
        ]
    }

    #[test]
    fn coalesces_sorted_and_unsorted_input() {
        let batch = compact_pfns(&two_regions(), [0x103, 0x101, 0x102, 0x100, 0x1, 0x0]);
        assert_eq!(
            batch.runs,
            vec![
                PageRun {
                    region: 0,
                    first_page: 0,
                    pages: 2
                },
                PageRun {
                    region: 1,
                    first_page: 0,
                    pages: 4
                },
            ]
        );
        assert_eq!(batch.outside_ram, 0);
    }

    #[test]
    fn rejects_pages_in_holes_and_beyond_ram() {
        // 0xa0..0xff is the hole, 0x500 is past the end.
        let batch = compact_pfns(&two_regions(), [0xa0, 0xff, 0x500, u32::MAX, 0x9f]);
        assert_eq!(batch.outside_ram, 4);
        assert_eq!(
            batch.runs,
            vec![PageRun {
                region: 0,
                first_page: 0x9f,
                pages: 1
            }]
        );
    }

    #[test]
    fn counts_duplicates_once() {
        let batch = compact_pfns(&two_regions(), [5, 5, 5, 6]);
        assert_eq!(batch.duplicates, 2);
        assert_eq!(
            batch.runs,
            vec![PageRun {
                region: 0,
                first_page: 5,
                pages: 2
            }]
        );
    }

    #[test]
    fn never_merges_across_regions() {
        let regions = vec![
            RamRegion {
                start_gpa: 0,
                size_bytes: 0x2000,
            },
            RamRegion {
                start_gpa: 0x2000,
                size_bytes: 0x2000,
            },
        ];
        let batch = compact_pfns(&regions, [0, 1, 2, 3]);
        assert_eq!(batch.runs.len(), 2);
    }

    #[test]
    fn reported_ranges_are_checked() {
        let regions = two_regions();
        assert_eq!(locate_range(&regions, 0x100000, 0), Err(RangeError::Empty));
        assert_eq!(
            locate_range(&regions, 0x100001, 4096),
            Err(RangeError::Unaligned)
        );
        assert_eq!(
            locate_range(&regions, 0x100000, 4095),
            Err(RangeError::Unaligned)
        );
        assert_eq!(
            locate_range(&regions, 0x400000, 0x200000),
            Err(RangeError::CrossesRegionEnd)
        );
        // From the end of region 0 into the hole.
        assert_eq!(
            locate_range(&regions, 0x9f000, 0x2000),
            Err(RangeError::CrossesRegionEnd)
        );
        assert_eq!(
            locate_range(&regions, 0xa0000, 4096),
            Err(RangeError::OutsideRam)
        );
        assert_eq!(
            locate_range(&regions, !0xfff, 4096),
            Err(RangeError::OutsideRam)
        );
        assert_eq!(
            locate_range(&regions, 0x300000, 0x200000),
            Ok(PageRun {
                region: 1,
                first_page: 0x200,
                pages: 0x200
            })
        );
    }

    #[test]
    fn parses_little_endian_and_flags_trailing_bytes() {
        assert_eq!(parse_pfns(&[1, 0, 0, 0, 0, 1, 0, 0]), (vec![1, 256], false));
        assert_eq!(parse_pfns(&[1, 0, 0, 0, 9]), (vec![1], true));
        assert_eq!(parse_pfns(&[]), (vec![], false));
    }

    #[test]
    fn only_whole_host_pages_are_kept() {
        let run = |first_page, pages| PageRun {
            region: 1,
            first_page,
            pages,
        };
        let two_mib = 2 << 20;
        // 4 KiB host pages: the run as it is.
        assert_eq!(
            whole_host_pages(&run(3, 5), PAGE_SIZE_BYTES),
            Some(ByteRun {
                region: 1,
                offset_bytes: 3 * 4096,
                len_bytes: 5 * 4096
            })
        );
        // 2 MiB host pages: pages 1..1025 hold the huge page 512..1024 only.
        assert_eq!(
            whole_host_pages(&run(1, 1024), two_mib),
            Some(ByteRun {
                region: 1,
                offset_bytes: two_mib,
                len_bytes: two_mib
            })
        );
        assert_eq!(whole_host_pages(&run(1, 600), two_mib), None);
        assert_eq!(whole_host_pages(&run(u64::MAX, 2), PAGE_SIZE_BYTES), None);
    }

    proptest! {
        #[test]
        fn whole_host_pages_are_exactly_the_aligned_pages_inside(
            first_page in 0u64..4096,
            pages in 0u64..4096,
            shift in 0u32..4,
        ) {
            let host_page = PAGE_SIZE_BYTES << (shift * 3);
            let run = PageRun { region: 0, first_page, pages };
            let expected: Vec<u64> = (0..(first_page + pages) * PAGE_SIZE_BYTES / host_page + 1)
                .map(|n| n * host_page)
                .filter(|start| {
                    *start >= first_page * PAGE_SIZE_BYTES
                        && start + host_page <= (first_page + pages) * PAGE_SIZE_BYTES
                })
                .collect();
            let got: Vec<u64> = whole_host_pages(&run, host_page)
                .map(|r| {
                    prop_assert_eq!(r.offset_bytes % host_page, 0);
                    prop_assert_eq!(r.len_bytes % host_page, 0);
                    Ok((r.offset_bytes..r.offset_bytes + r.len_bytes).step_by(host_page as usize).collect())
                })
                .transpose()?
                .unwrap_or_default();
            prop_assert_eq!(got, expected);
        }

        #[test]
        fn runs_cover_exactly_the_valid_distinct_pfns(pfns in proptest::collection::vec(0u32..0x600, 0..600)) {
            let regions = two_regions();
            let batch = compact_pfns(&regions, pfns.iter().copied());
            let mut expected: Vec<(usize, u64)> = pfns
                .iter()
                .filter_map(|p| locate_page(&regions, u64::from(*p) << PAGE_SHIFT))
                .collect();
            expected.sort_unstable();
            expected.dedup();
            let covered: Vec<(usize, u64)> = batch
                .runs
                .iter()
                .flat_map(|r| (r.first_page..r.first_page + r.pages).map(move |p| (r.region, p)))
                .collect();
            prop_assert_eq!(&covered, &expected);
            prop_assert_eq!(batch.outside_ram + batch.duplicates + expected.len(), pfns.len());
            // Runs are maximal: no two consecutive runs touch.
            for pair in batch.runs.windows(2) {
                prop_assert!(pair[0].region != pair[1].region
                    || pair[0].first_page + pair[0].pages < pair[1].first_page);
            }
            for run in &batch.runs {
                let region = regions[run.region];
                prop_assert!((run.first_page + run.pages) * PAGE_SIZE_BYTES <= region.size_bytes);
            }
        }
    }
}

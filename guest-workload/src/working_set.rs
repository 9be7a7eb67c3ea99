//! The workload's anonymous memory: mapped in chunks so that shrinking it
//! unmaps them and the guest's allocator gets the pages back at once (a
//! heap would keep them).

use memmap2::MmapMut;

pub const MIB: usize = 1 << 20;
/// Each chunk is a mapping of its own.
pub const CHUNK_MIB: u64 = 4;
/// The guest's page size: one write per page keeps the page in use.
const PAGE_BYTES: usize = 4096;

#[derive(Default)]
pub struct WorkingSet {
    chunks: Vec<MmapMut>,
    /// Written into every page by each pass, so every pass dirties them.
    generation: u8,
}

impl WorkingSet {
    pub fn mib(&self) -> u64 {
        self.chunks.len() as u64 * CHUNK_MIB
    }

    /// Grows (mapping and touching new chunks) or shrinks (unmapping the
    /// last ones) to `mib`, rounded up to whole chunks.
    pub fn resize(&mut self, mib: u64) -> std::io::Result<()> {
        let chunks = usize::try_from(mib.div_ceil(CHUNK_MIB)).map_err(std::io::Error::other)?;
        self.chunks.truncate(chunks);
        while self.chunks.len() < chunks {
            let mut chunk = MmapMut::map_anon(CHUNK_MIB as usize * MIB)?;
            touch(&mut chunk, self.generation);
            self.chunks.push(chunk);
        }
        Ok(())
    }

    /// Writes every page once.
    pub fn touch_all(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        for chunk in &mut self.chunks {
            touch(chunk, self.generation);
        }
    }
}

fn touch(chunk: &mut [u8], value: u8) {
    for page in chunk.chunks_mut(PAGE_BYTES) {
        if let Some(first) = page.first_mut() {
            *first = value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resizing_rounds_to_chunks_and_shrinks() {
        let mut set = WorkingSet::default();
        set.resize(9).unwrap();
        assert_eq!(set.mib(), 12);
        set.touch_all();
        set.resize(4).unwrap();
        assert_eq!(set.mib(), 4);
        set.resize(0).unwrap();
        assert_eq!(set.mib(), 0);
    }
}

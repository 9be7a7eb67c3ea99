//! Page cache: buffered reads of a file or block device, so the guest
//! keeps its contents cached and a re-read after the cache was taken costs
//! real I/O.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::working_set::MIB;

pub struct CacheReader {
    file: File,
    buffer: Vec<u8>,
}

impl CacheReader {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Ok(CacheReader {
            file: File::open(path)?,
            buffer: vec![0; MIB],
        })
    }

    /// Reads the first `mib` of the file (less at its end); returns the
    /// bytes read.
    pub fn read_head(&mut self, mib: u64) -> std::io::Result<u64> {
        self.file.seek(SeekFrom::Start(0))?;
        let wanted = mib.saturating_mul(MIB as u64);
        let mut read = 0u64;
        while read < wanted {
            let n = self.file.read(&mut self.buffer)?;
            if n == 0 {
                break;
            }
            read = read.saturating_add(n as u64);
        }
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_up_to_the_end_of_the_file() {
        let dir = std::env::temp_dir().join(format!("guest-workload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("data");
        std::fs::write(&path, vec![1u8; 3 * MIB / 2]).unwrap();
        let mut reader = CacheReader::open(&path).unwrap();
        assert_eq!(reader.read_head(1).unwrap(), MIB as u64);
        assert_eq!(reader.read_head(4).unwrap(), 3 * MIB as u64 / 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

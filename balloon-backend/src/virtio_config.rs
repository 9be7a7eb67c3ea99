//! The 16-byte virtio-balloon config space. The device owns `num_pages` and
//! `free_page_hint_cmd_id`; the driver owns `actual` and `poison_val`. The
//! Linux driver writes `num_pages` and `actual` together, so a write keeps
//! only the bytes that fall in driver-owned fields.

use std::ops::Range;

pub const CONFIG_BYTES: usize = 16;
const NUM_PAGES: Range<usize> = 0..4;
const ACTUAL: Range<usize> = 4..8;
const FREE_PAGE_HINT_CMD_ID: Range<usize> = 8..12;
const POISON_VAL: Range<usize> = 12..16;

/// Why a config access was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("config access of {size} bytes at offset {offset} is outside the {CONFIG_BYTES}-byte config space")]
pub struct OutOfRange {
    pub offset: u32,
    pub size: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_BYTES],
}

/// Which driver-owned fields a write changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WriteEffect {
    pub actual_changed: bool,
    pub poison_changed: bool,
}

fn span(offset: u32, size: usize) -> Result<Range<usize>, OutOfRange> {
    let start = offset as usize;
    match start.checked_add(size) {
        Some(end) if end <= CONFIG_BYTES => Ok(start..end),
        _ => Err(OutOfRange { offset, size }),
    }
}

impl ConfigSpace {
    /// The whole config space, as a saved state carries it.
    pub fn to_bytes(&self) -> [u8; CONFIG_BYTES] {
        self.bytes
    }

    /// A config space from saved bytes.
    pub fn from_bytes(bytes: [u8; CONFIG_BYTES]) -> Self {
        ConfigSpace { bytes }
    }

    fn field(&self, range: Range<usize>) -> u32 {
        let mut value = [0u8; 4];
        if let Some(bytes) = self.bytes.get(range) {
            value.copy_from_slice(bytes);
        }
        u32::from_le_bytes(value)
    }

    fn set_field(&mut self, range: Range<usize>, value: u32) {
        if let Some(bytes) = self.bytes.get_mut(range) {
            bytes.copy_from_slice(&value.to_le_bytes());
        }
    }

    pub fn num_pages(&self) -> u32 {
        self.field(NUM_PAGES)
    }
    pub fn actual(&self) -> u32 {
        self.field(ACTUAL)
    }
    pub fn free_page_hint_cmd_id(&self) -> u32 {
        self.field(FREE_PAGE_HINT_CMD_ID)
    }
    pub fn poison_val(&self) -> u32 {
        self.field(POISON_VAL)
    }

    /// Device side: the balloon target in 4 KiB pages.
    pub fn set_num_pages(&mut self, pages: u32) {
        self.set_field(NUM_PAGES, pages)
    }

    /// A new driver (the guest was reset): the driver's fields start over,
    /// the device's (the target) stay.
    pub fn driver_reset(&mut self) {
        self.set_field(ACTUAL, 0);
        self.set_field(POISON_VAL, 0);
    }

    /// A guest read.
    pub fn read(&self, offset: u32, size: usize) -> Result<Vec<u8>, OutOfRange> {
        let range = span(offset, size)?;
        Ok(self
            .bytes
            .get(range)
            .map(<[u8]>::to_vec)
            .unwrap_or_default())
    }

    /// A guest write: only bytes inside driver-owned fields are taken.
    pub fn write(&mut self, offset: u32, data: &[u8]) -> Result<WriteEffect, OutOfRange> {
        let range = span(offset, data.len())?;
        let before = self.clone();
        for (index, byte) in range.zip(data) {
            if ACTUAL.contains(&index) || POISON_VAL.contains(&index) {
                if let Some(slot) = self.bytes.get_mut(index) {
                    *slot = *byte;
                }
            }
        }
        Ok(WriteEffect {
            actual_changed: before.actual() != self.actual(),
            poison_changed: before.poison_val() != self.poison_val(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_full_width_write_keeps_device_target() {
        let mut config = ConfigSpace::default();
        config.set_num_pages(1000);
        let mut write = Vec::new();
        write.extend_from_slice(&7u32.to_le_bytes());
        write.extend_from_slice(&500u32.to_le_bytes());
        let effect = config.write(0, &write).unwrap();
        assert!(effect.actual_changed);
        assert_eq!(config.num_pages(), 1000);
        assert_eq!(config.actual(), 500);
    }

    #[test]
    fn poison_and_partial_writes() {
        let mut config = ConfigSpace::default();
        config.write(12, &0xaaaa_aaaau32.to_le_bytes()).unwrap();
        assert_eq!(config.poison_val(), 0xaaaa_aaaa);
        config.write(5, &[1]).unwrap();
        assert_eq!(config.actual(), 256);
        // free_page_hint_cmd_id is device-owned.
        config.write(8, &[9, 9, 9, 9]).unwrap();
        assert_eq!(config.free_page_hint_cmd_id(), 0);
    }

    #[test]
    fn a_driver_reset_clears_only_the_drivers_fields() {
        let mut config = ConfigSpace::default();
        config.set_num_pages(1000);
        config.write(4, &500u32.to_le_bytes()).unwrap();
        config.write(12, &0xaau32.to_le_bytes()).unwrap();
        config.driver_reset();
        assert_eq!(
            (config.num_pages(), config.actual(), config.poison_val()),
            (1000, 0, 0)
        );
    }

    #[test]
    fn reads_and_writes_outside_are_refused() {
        let mut config = ConfigSpace::default();
        assert!(config.read(12, 8).is_err());
        assert!(config.read(u32::MAX, 4).is_err());
        assert!(config.write(16, &[1]).is_err());
        assert!(config.write(15, &[1, 2]).is_err());
        assert_eq!(config, ConfigSpace::default());
        assert_eq!(config.read(0, 16).unwrap().len(), 16);
        assert_eq!(config.read(4, 0).unwrap().len(), 0);
    }
}

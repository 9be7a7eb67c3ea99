//! The stats buffer and config-space accesses, as the guest sends them: no
//! panic, trailing bytes reported, and guest writes never touch the
//! device-owned fields.

#![no_main]

use balloon_backend::virtio_config::ConfigSpace;
use balloon_backend::stats;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (_, notes) = stats::parse(data, 0);
    assert_eq!(notes.trailing_bytes, data.len() % stats::RECORD_BYTES);

    let mut config = ConfigSpace::default();
    config.set_num_pages(0x1234_5678);
    for chunk in data.chunks(6) {
        let Some((&offset, bytes)) = chunk.split_first() else { continue };
        let offset = u32::from(offset);
        match config.write(offset, bytes) {
            Ok(_) => assert!(offset as usize + bytes.len() <= 16),
            Err(_) => assert!(offset as usize + bytes.len() > 16),
        }
        let _read = config.read(offset, bytes.len());
        assert_eq!(config.num_pages(), 0x1234_5678, "a guest write changed num_pages");
        assert_eq!(config.free_page_hint_cmd_id(), 0);
    }
});

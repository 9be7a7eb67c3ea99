//! (a) The guest's own virtio_balloon driver binds to the vhost-user device
//! and negotiates the offered features.

use guest_tests::Stack;

#[test]
fn guest_driver_binds_and_negotiates() -> anyhow::Result<()> {
    let mut stack = Stack::start(512, &[], |_| {})?;
    let line = stack
        .vm
        .console()
        .into_iter()
        .find(|l| l.starts_with("@@BALLOON "))
        .ok_or_else(|| anyhow::anyhow!("no balloon device seen by the guest"))?;
    assert!(line.contains("driver=virtio_balloon"), "{line}");
    // The guest's feature string: character i is bit i.
    let bits = line.split("features=").nth(1).unwrap_or_default();
    for (bit, name) in [
        // Acked, so the backend may defer and coalesce punches.
        (0, "MUST_TELL_HOST"),
        (1, "STATS_VQ"),
        (2, "DEFLATE_ON_OOM"),
        (5, "REPORTING"),
        (32, "VERSION_1"),
    ] {
        assert_eq!(
            bits.as_bytes().get(bit),
            Some(&b'1'),
            "{name} not negotiated: {bits}"
        );
    }
    let status = stack.control.status()?;
    let features = &status.features;
    for name in [
        "MUST_TELL_HOST",
        "STATS_VQ",
        "DEFLATE_ON_OOM",
        "REPORTING",
        "VERSION_1",
    ] {
        assert!(
            features.iter().any(|f| f == name),
            "backend does not report {name}: {features:?}"
        );
    }
    assert!(
        status.config_notify,
        "config-change channel not found: {status:?}"
    );
    assert_eq!(status.guest_ram_bytes, 512u64 << 20);
    Ok(())
}

pub fn run(_env: &guest_tests::env::TestEnv) -> anyhow::Result<()> {
    Ok(())
}

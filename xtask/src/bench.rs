//! Placeholder until the benchmark runner lands.

pub fn run(_bin: &std::path::Path, _args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("bench not implemented yet")
}

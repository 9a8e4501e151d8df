//! Memory soak (placeholder until written below).
use anyhow::Result;
use std::path::Path;
pub fn run(_bin: &Path, _args: &[String]) -> Result<()> {
    Ok(())
}

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use super::progress;

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// A shard folder (searched recursively for *.shard) or one shard file.
    dir: PathBuf,
}

/// Checks every brick, the class locations and the header of every shard; lists the
/// bad ones and exits non-zero if there is any.
pub fn run(a: VerifyArgs) -> Result<()> {
    let paths = if a.dir.is_file() { vec![a.dir.clone()] } else { cps3d_storage::find_shards(&a.dir)? };
    if paths.is_empty() {
        bail!("{}: no *.shard files found", a.dir.display());
    }
    let pb = progress::bar(paths.len() as u64, "verify");
    let mut bad = Vec::new();
    let (mut raw, mut stored) = (0u64, 0u64);
    for p in &paths {
        match cps3d_storage::verify_shard(p) {
            Ok(s) => {
                raw += s.image_raw_bytes + s.label_raw_bytes;
                stored += s.file_len;
                println!(
                    "ok   {}  {:?} (z,y,x)  {} classes  {:.1}x compressed",
                    p.display(),
                    s.shape,
                    s.classes,
                    s.compression_ratio()
                );
            }
            Err(e) => {
                println!("BAD  {e}");
                bad.push(p.clone());
            }
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    println!(
        "{} shard(s) checked, {} bad; {:.1} MB of voxels in {:.1} MB ({:.1}x)",
        paths.len(),
        bad.len(),
        raw as f64 / 1e6,
        stored as f64 / 1e6,
        raw as f64 / stored.max(1) as f64
    );
    if !bad.is_empty() {
        bail!(
            "{} bad shard(s): {}",
            bad.len(),
            bad.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

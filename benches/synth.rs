//! Phantom synthesis on one core: generating a 64×128×128 case, and generating plus
//! writing it as `.nii.gz` (level 1) — the target is ≥ 50 MB/s of voxels (int16
//! image + uint8 labels) on one core.

use std::hint::black_box;

use cps3d::io::nifti::{write_volume_with, WriterOptionsFlavour};
use cps3d::synth::phantom::{generate, PhantomGrid};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::SeedableRng;

fn bench(c: &mut Criterion) {
    let grid = PhantomGrid { shape: [64, 128, 128], spacing: [4.0, 2.9, 2.9], fat_planes: true };
    let voxel_bytes = (grid.shape.iter().product::<usize>() * 3) as u64;
    let mut g = c.benchmark_group("synth");
    g.sample_size(20);
    g.throughput(Throughput::Bytes(voxel_bytes));
    let mut seed = 0u64;
    g.bench_function("generate_64x128x128", |b| {
        b.iter(|| {
            seed += 1;
            black_box(generate(grid, &mut rand_pcg::Pcg64Mcg::seed_from_u64(seed)))
        })
    });
    let dir = tempfile::tempdir().expect("temporary folder");
    for (name, ending) in [("generate_and_write_gz1", "nii.gz"), ("generate_and_write_nii", "nii")] {
        g.bench_function(name, |b| {
            b.iter(|| {
                seed += 1;
                let p = generate(grid, &mut rand_pcg::Pcg64Mcg::seed_from_u64(seed));
                let flavour = WriterOptionsFlavour::Scratch(1);
                write_volume_with(&dir.path().join(format!("l.{ending}")), p.labels.view(), &p.geometry, flavour)
                    .unwrap();
                write_volume_with(&dir.path().join(format!("i.{ending}")), p.image.view(), &p.geometry, flavour)
                    .unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

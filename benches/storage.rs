//! Shard storage: random patch reads (image + labels) and writes, for several brick shapes, zstd
//! levels and image filters, on a synthetic 200 x 400 x 400 CT and on the real CT in
//! ../shared/data (skipped when absent). Compression ratios and bytes decompressed per patch are
//! printed as a table before the timings. The figures in storage/FORMAT.md come from
//! `cargo bench --bench storage`.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cps3d_storage::{ImageFilter, Scratch, Shard, ShardInput, ShardWriter};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;

/// nnU-Net's 3D full-resolution patch for abdominal CT, (z, y, x).
const PATCH: [usize; 3] = [112, 160, 128];
/// The region a rotated patch is cut from (about 1.6x per axis).
const ROTATION: [usize; 3] = [180, 256, 205];
const SYNTH_SHAPE: [usize; 3] = [200, 400, 400];

struct Config {
    brick: [usize; 3],
    level: i32,
    filter: ImageFilter,
}

impl Config {
    fn name(&self) -> String {
        let [z, y, x] = self.brick;
        let filter = match self.filter {
            ImageFilter::ByteSplit => "",
            ImageFilter::None => "-nosplit",
        };
        format!("{z}x{y}x{x}-l{}{filter}", self.level)
    }
}

fn configs() -> Vec<Config> {
    let c = |brick, level, filter| Config { brick, level, filter };
    let split = ImageFilter::ByteSplit;
    vec![
        c([32, 32, 32], 1, split),
        c([32, 32, 32], 3, split),
        c([32, 32, 32], 6, split),
        c([32, 32, 32], 3, ImageFilter::None),
        c([64, 64, 64], 1, split),
        c([64, 64, 64], 3, split),
        c([64, 64, 64], 6, split),
        c([64, 64, 64], 3, ImageFilter::None),
        c([16, 64, 64], 1, split),
        c([16, 64, 64], 3, split),
        c([32, 64, 64], 3, split),
        c([16, 32, 32], 3, split),
    ]
}

struct Dataset {
    name: &'static str,
    shape: [usize; 3],
    image: Vec<i16>,
    labels: Vec<u8>,
}

fn synthetic() -> Dataset {
    let grid = cps3d::synth::phantom::PhantomGrid { shape: SYNTH_SHAPE, spacing: [1.5, 0.9, 0.9], fat_planes: true };
    let phantom = cps3d::synth::phantom::generate(grid, &mut Pcg64Mcg::seed_from_u64(1));
    Dataset {
        name: "synth",
        shape: SYNTH_SHAPE,
        image: phantom.image.as_standard_layout().iter().copied().collect(),
        labels: phantom.labels.as_standard_layout().iter().copied().collect(),
    }
}

fn real_ct() -> Option<Dataset> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/Dataset001_TSAbdomen");
    let (image_path, label_path) = (root.join("imagesTr/tsabd_0000.nii.gz"), root.join("labelsTr/tsabd.nii.gz"));
    if !image_path.exists() || !label_path.exists() {
        println!("storage bench: {} not found, skipping the real-CT benchmarks", root.display());
        return None;
    }
    let image = cps3d::io::read_image(&image_path).expect("reading the real CT");
    let labels = cps3d::io::read_labels(&label_path).expect("reading the real CT's labels");
    let shape = <[usize; 3]>::try_from(image.data.shape()).expect("a 3D volume");
    assert_eq!(labels.data.shape(), image.data.shape());
    Some(Dataset {
        name: "ct",
        shape,
        // CT is stored in integer HU; rounding is exact for integer-valued NIfTI data.
        image: image.data.iter().map(|v| v.round().clamp(i16::MIN.into(), i16::MAX.into()) as i16).collect(),
        labels: labels.data.as_standard_layout().iter().copied().collect(),
    })
}

/// Patch origins as nnU-Net samples them: the patch centre anywhere in the volume, so patches
/// reach outside it and are padded.
fn origins(shape: [usize; 3], size: [usize; 3], count: usize) -> Vec<[i64; 3]> {
    let mut rng = Pcg64Mcg::seed_from_u64(7);
    (0..count)
        .map(|_| {
            [0, 1, 2].map(|a| {
                let half = (size[a] / 2) as i64;
                rng.random_range(-half..(shape[a] as i64 - half).max(-half + 1))
            })
        })
        .collect()
}

/// Average raw bytes decompressed per region read (image + labels): the bricks' overhang.
fn decompressed_per_read(shard: &Shard, origins: &[[i64; 3]], size: [usize; 3]) -> f64 {
    let (shape, brick) = (shard.shape(), shard.brick_shape());
    let mut total = 0usize;
    for o in origins {
        let mut voxels = 1usize;
        for a in 0..3 {
            let lo = o[a].max(0) as usize;
            let hi = ((o[a] + size[a] as i64).min(shape[a] as i64)).max(0) as usize;
            if lo >= hi {
                voxels = 0;
                break;
            }
            let (b0, b1) = (lo / brick[a], (hi - 1) / brick[a]);
            voxels *= ((b1 + 1) * brick[a]).min(shape[a]) - b0 * brick[a];
        }
        total += voxels * 3;
    }
    total as f64 / origins.len() as f64
}

struct Written {
    config: String,
    path: PathBuf,
}

fn write_all(dir: &Path, data: &Dataset, configs: &[Config]) -> Vec<Written> {
    println!(
        "\n{:<6} {:<20} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10} {:>9}",
        "data", "config", "file MB", "image x", "label x", "total x", "f32 x", "write s", "patch MB*", "rot. MB*"
    );
    let patch_origins = origins(data.shape, PATCH, 256);
    let rotation_origins = origins(data.shape, ROTATION, 256);
    configs
        .iter()
        .map(|c| {
            let path = dir.join(format!("{}-{}.shard", data.name, c.name()));
            let input = ShardInput::new(data.shape, [1.0; 3], &data.image).with_labels(&data.labels);
            let writer =
                ShardWriter::default().with_brick_shape(c.brick).with_zstd_level(c.level).with_image_filter(c.filter);
            let start = Instant::now();
            let s = writer.write(&path, &input).expect("writing a shard");
            let secs = start.elapsed().as_secs_f64();
            let shard = Shard::open(&path).expect("opening a shard");
            println!(
                "{:<6} {:<20} {:>8.2} {:>8.2} {:>8.1} {:>8.2} {:>8.2} {:>8.2} {:>10.1} {:>9.1}",
                data.name,
                c.name(),
                s.file_len as f64 / 1e6,
                s.image_ratio(),
                s.label_ratio(),
                s.compression_ratio(),
                // Against nnU-Net's raw bytes: float32 image + u8 labels.
                (data.labels.len() * 5) as f64 / s.file_len as f64,
                secs,
                decompressed_per_read(&shard, &patch_origins, PATCH) / 1e6,
                decompressed_per_read(&shard, &rotation_origins, ROTATION) / 1e6,
            );
            Written { config: c.name(), path }
        })
        .collect()
}

fn bench_reads(c: &mut Criterion, data: &Dataset, shards: &[Written], size: [usize; 3], what: &str) {
    let voxels = size.iter().product::<usize>();
    let mut group = c.benchmark_group(format!("read/{}/{what}", data.name));
    group.throughput(Throughput::Bytes(voxels as u64 * 3));
    let origins = origins(data.shape, size, 256);
    for w in shards {
        let shard = Shard::open(&w.path).expect("opening a shard");
        let mut scratch = Scratch::new();
        let (mut image, mut labels) = (vec![0i16; voxels], vec![0u8; voxels]);
        let mut next = 0;
        group.bench_function(BenchmarkId::from_parameter(&w.config), |b| {
            b.iter(|| {
                let origin = origins[next % origins.len()];
                next += 1;
                shard.read_image_region(&mut scratch, origin, size, 0, &mut image).expect("image read");
                shard.read_label_region(&mut scratch, origin, size, 255, &mut labels).expect("label read");
                black_box((&image, &labels));
            })
        });
    }
    group.finish();
}

fn bench_f32(c: &mut Criterion, data: &Dataset, shard: &Written) {
    let voxels = PATCH.iter().product::<usize>();
    let mut group = c.benchmark_group(format!("read_f32/{}/patch", data.name));
    group.throughput(Throughput::Bytes(voxels as u64 * 3));
    let origins = origins(data.shape, PATCH, 256);
    let shard_name = &shard.config;
    let shard = Shard::open(&shard.path).expect("opening a shard");
    let mut scratch = Scratch::new();
    let (mut image, mut labels) = (vec![0f32; voxels], vec![0u8; voxels]);
    let mut next = 0;
    group.bench_function(BenchmarkId::from_parameter(shard_name), |b| {
        b.iter(|| {
            let origin = origins[next % origins.len()];
            next += 1;
            shard.read_image_region_f32(&mut scratch, origin, PATCH, 0.0, &mut image).expect("image read");
            shard.read_label_region(&mut scratch, origin, PATCH, 255, &mut labels).expect("label read");
            black_box((&image, &labels));
        })
    });
    group.finish();
}

fn bench_writes(c: &mut Criterion, dir: &Path, data: &Dataset, configs: &[Config]) {
    let mut group = c.benchmark_group(format!("write/{}", data.name));
    group.throughput(Throughput::Bytes(data.image.len() as u64 * 3));
    group.measurement_time(Duration::from_secs(5));
    for cfg in configs {
        let path = dir.join(format!("write-{}.shard", cfg.name()));
        let input = ShardInput::new(data.shape, [1.0; 3], &data.image).with_labels(&data.labels);
        let writer =
            ShardWriter::default().with_brick_shape(cfg.brick).with_zstd_level(cfg.level).with_image_filter(cfg.filter);
        group.bench_function(BenchmarkId::from_parameter(cfg.name()), |b| {
            b.iter(|| writer.write(&path, &input).expect("writing a shard"))
        });
    }
    group.finish();
}

fn storage(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let configs = configs();
    let start = Instant::now();
    let synth = synthetic();
    println!("storage bench: synthetic {SYNTH_SHAPE:?} phantom generated in {:.1} s", start.elapsed().as_secs_f64());
    let ct = real_ct();
    if let Some(ct) = &ct {
        println!("storage bench: real CT {:?}: a {PATCH:?} patch is mostly padding there", ct.shape);
    }
    println!("(x = raw i16 image + u8 label bytes / stored bytes; f32 x = the same with a float32 image, as nnU-Net's\n ratio counts; * = average MB decompressed per read, image + labels)");
    let synth_shards = write_all(dir.path(), &synth, &configs);
    let ct_shards = ct.as_ref().map(|ct| write_all(dir.path(), ct, &configs)).unwrap_or_default();
    println!();

    bench_reads(c, &synth, &synth_shards, PATCH, "patch");
    bench_reads(c, &synth, &synth_shards, ROTATION, "rotation");
    bench_f32(c, &synth, &synth_shards[1]);
    if let Some(ct) = &ct {
        bench_reads(c, ct, &ct_shards, PATCH, "patch");
        bench_reads(c, ct, &ct_shards, ROTATION, "rotation");
    }
    let write_configs: Vec<Config> =
        configs.into_iter().filter(|c| c.filter == ImageFilter::ByteSplit && c.brick == [32, 32, 32]).collect();
    bench_writes(c, dir.path(), &synth, &write_configs);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = storage
}
criterion_main!(benches);

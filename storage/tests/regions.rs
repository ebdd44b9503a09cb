//! Region reads agree with crops of the dense volume, wherever the region lies.

mod common;

use std::sync::Arc;

use cps3d_storage::{ImageFilter, Scratch, Shard, ShardInput, ShardWriter};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::{crop, make_case};

fn axis_brick() -> impl Strategy<Value = usize> {
    prop_oneof![4 => 1usize..=12, 1 => 1usize..=48]
}

fn region() -> impl Strategy<Value = ([i64; 3], [usize; 3])> {
    (prop::array::uniform3(-45i64..45), prop::array::uniform3(0usize..50))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    #[test]
    fn region_reads_match_dense_crops(
        shape in prop::array::uniform3(1usize..=40),
        brick in [axis_brick(), axis_brick(), axis_brick()],
        channels in 1usize..=2,
        split in any::<bool>(),
        level in prop_oneof![Just(1), Just(3), Just(-1)],
        seed in any::<u64>(),
        regions in prop::collection::vec(region(), 6),
    ) {
        let case = make_case(shape, channels, seed);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("case.shard");
        let filter = if split { ImageFilter::ByteSplit } else { ImageFilter::None };
        let (scale, offset) = (0.5f32, -3.25f32);
        let input = ShardInput::new(shape, [2.0, 0.7, 0.7], &case.image)
            .with_channels(channels)
            .with_labels(&case.labels)
            .with_intensity_map(scale, offset);
        ShardWriter::default()
            .with_brick_shape(brick)
            .with_zstd_level(level)
            .with_image_filter(filter)
            .write(&path, &input)
            .unwrap();
        let shard = Shard::open(&path).unwrap();
        let n = shape.iter().product::<usize>();
        let mut scratch = Scratch::new();
        for (origin, size) in regions {
            let m = size.iter().product::<usize>();
            let mut image = vec![0i16; m * channels];
            shard.read_image_region(&mut scratch, origin, size, -7, &mut image).unwrap();
            let mut mapped = vec![0f32; m * channels];
            shard.read_image_region_f32(&mut scratch, origin, size, 0.0, &mut mapped).unwrap();
            for ch in 0..channels {
                let expected = crop(&case.image[ch * n..(ch + 1) * n], shape, origin, size, -7);
                prop_assert_eq!(&image[ch * m..(ch + 1) * m], &expected[..]);
                let dense_f32: Vec<f32> =
                    case.image[ch * n..(ch + 1) * n].iter().map(|&v| f32::from(v) * scale + offset).collect();
                prop_assert_eq!(&mapped[ch * m..(ch + 1) * m], &crop(&dense_f32, shape, origin, size, 0.0)[..]);
            }
            let mut labels = vec![0u8; m];
            shard.read_label_region(&mut scratch, origin, size, 255, &mut labels).unwrap();
            prop_assert_eq!(labels, crop(&case.labels, shape, origin, size, 255));
        }
    }
}

#[test]
fn accessors_return_what_was_written() {
    let case = make_case([9, 10, 11], 1, 3);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.shard");
    let meta = r#"{"case":"tsabd_0000","crop":[[0,9],[0,10],[0,11]],"spacing":[2.5,0.8,0.8]}"#;
    let input = ShardInput::new(case.shape, [2.0, 0.75, 0.5], &case.image)
        .with_labels(&case.labels)
        .with_metadata(meta)
        .with_intensity_map(2.0, 1.0);
    let written = ShardWriter::default().with_brick_shape([4, 5, 6]).with_zstd_level(5).write(&path, &input).unwrap();
    let shard = Shard::open(&path).unwrap();
    assert_eq!(shard.shape(), [9, 10, 11]);
    assert_eq!(shard.spacing(), [2.0, 0.75, 0.5]);
    assert_eq!(shard.brick_shape(), [4, 5, 6]);
    assert_eq!(shard.brick_counts(), [3, 2, 2]);
    assert_eq!(shard.channels(), 1);
    assert!(shard.has_labels());
    assert_eq!(shard.intensity_map(), (2.0, 1.0));
    assert_eq!(shard.zstd_level(), 5);
    assert_eq!(shard.metadata(), meta);
    assert_eq!(shard.summary(), written);
    assert_eq!(written.file_len, std::fs::metadata(&path).unwrap().len());
    let classes: Vec<u8> = shard.classes().iter().map(|c| c.class).collect();
    let mut present: Vec<u8> = case.labels.iter().copied().filter(|&l| l != 0).collect();
    present.sort();
    present.dedup();
    assert_eq!(classes, present);
}

#[test]
fn image_only_shards_refuse_label_reads() {
    let case = make_case([5, 6, 7], 1, 4);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("u.shard");
    ShardWriter::default().write(&path, &ShardInput::new(case.shape, [1.0; 3], &case.image)).unwrap();
    let shard = Shard::open(&path).unwrap();
    assert!(!shard.has_labels());
    assert!(shard.classes().is_empty());
    assert!(shard.class_locations(1).is_empty());
    let mut scratch = Scratch::new();
    let mut out = vec![0u8; 8];
    let err = shard.read_label_region(&mut scratch, [0; 3], [2, 2, 2], 0, &mut out).unwrap_err();
    assert!(err.to_string().contains("no labels"), "{err}");
    let mut wrong = vec![0i16; 7];
    let err = shard.read_image_region(&mut scratch, [0; 3], [2, 2, 2], 0, &mut wrong).unwrap_err();
    assert!(err.to_string().contains("needs 8"), "{err}");
}

#[test]
fn shards_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Shard>();
    check::<Arc<Shard>>();
    fn send<T: Send>() {}
    send::<Scratch>();
}

#[test]
fn many_threads_share_one_shard() {
    let shape = [37, 45, 51];
    let case = make_case(shape, 1, 11);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.shard");
    let input = ShardInput::new(shape, [1.0; 3], &case.image).with_labels(&case.labels);
    ShardWriter::default().with_brick_shape([8, 16, 16]).write(&path, &input).unwrap();
    let shard = Arc::new(Shard::open(&path).unwrap());
    let case = Arc::new(case);
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (shard, case) = (Arc::clone(&shard), Arc::clone(&case));
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(t);
                let mut scratch = Scratch::new();
                for _ in 0..60 {
                    let size = [0, 1, 2].map(|_| rng.random_range(1..30usize));
                    let origin = [0, 1, 2].map(|a| rng.random_range(-20..shape[a] as i64 + 5));
                    let m = size.iter().product();
                    let mut image = vec![0i16; m];
                    let mut labels = vec![0u8; m];
                    shard.read_image_region(&mut scratch, origin, size, 0, &mut image).unwrap();
                    shard.read_label_region(&mut scratch, origin, size, 255, &mut labels).unwrap();
                    assert_eq!(image, crop(&case.image, shape, origin, size, 0));
                    assert_eq!(labels, crop(&case.labels, shape, origin, size, 255));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

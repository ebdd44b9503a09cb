//! Abdominal CT phantoms: a body of air, fat, muscle, bone and the 13 FLARE22 organs
//! at their usual places and Hounsfield values, each case randomly deformed.
//!
//! Anatomy is laid out in millimetres in a patient frame centred on the body:
//! X towards the patient's left, Y posterior, Z superior (origin near L1), then turned
//! into the canonical RAS array order. Every
//! organ is a smooth deformed ellipsoid, tube or torus segment; painting loops only
//! over each organ's bounding box, so a case costs a few tens of ns per voxel.

use ndarray::Array3;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::io::Geometry;

/// HU limits of what is stored (int16, as scanners write it).
const HU_MIN: f32 = -1024.0;
const HU_MAX: f32 = 3071.0;

/// Parameters of one phantom: its grid, and which anatomy revision.
#[derive(Debug, Clone, Copy)]
pub struct PhantomGrid {
    /// (z, y, x) voxels.
    pub shape: [usize; 3],
    /// (z, y, x) mm.
    pub spacing: [f64; 3],
    /// Fat around the adrenal glands and the esophagus (and an esophagus of 9 mm radius, not
    /// 7), as in CT: without it both have the HU of the soft tissue around them and can only
    /// be found by position. Off: the phantoms of earlier versions, which the golden
    /// inference tests were recorded on.
    pub fat_planes: bool,
}

/// One generated scan.
pub struct Phantom {
    pub image: Array3<i16>,
    pub labels: Array3<u8>,
    pub geometry: Geometry,
}

/// A smooth, randomly deformed closed shape.
#[derive(Debug, Clone)]
enum Shape {
    /// Ellipsoid with centre, semi-axes and rotation (rows: the ellipsoid's axes in
    /// the patient frame), whose surface is pushed in and out by three sinusoids.
    Blob { c: [f64; 3], r: [f64; 3], rot: [[f64; 3]; 3], waves: [Wave; 3] },
    /// A vessel-like tube along Z from `z0` to `z1`, its centre wandering in X and Y.
    Tube { x0: f64, y0: f64, z0: f64, z1: f64, radius: f64, wander: [Wave; 2] },
    /// A torus segment in the coronal (X-Z) plane: the duodenum's C loop.
    Loop { c: [f64; 3], big_r: f64, small_r: f64, open_angle: f64 },
}

#[derive(Debug, Clone, Copy)]
struct Wave {
    dir: [f64; 3],
    k: f64,
    amp: f64,
    phase: f64,
}

impl Wave {
    fn random(rng: &mut impl Rng, amp_max: f64) -> Wave {
        let v: [f64; 3] = [rng.sample(StandardNormal), rng.sample(StandardNormal), rng.sample(StandardNormal)];
        let n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt().max(1e-9);
        Wave {
            dir: [v[0] / n, v[1] / n, v[2] / n],
            k: rng.random_range(1.5..3.5),
            amp: rng.random_range(0.3 * amp_max..amp_max),
            phase: rng.random_range(0.0..std::f64::consts::TAU),
        }
    }

    #[inline]
    fn at(&self, q: [f64; 3]) -> f64 {
        self.amp * fast_sin(self.k * (q[0] * self.dir[0] + q[1] * self.dir[1] + q[2] * self.dir[2]) + self.phase)
    }
}

/// A smooth sine approximation (error < 0.001), several times cheaper than libm's:
/// shapes only need a smooth periodic wave, and this is evaluated for most voxels.
#[inline]
fn fast_sin(x: f64) -> f64 {
    let t = x * (0.5 / std::f64::consts::PI);
    // Wrap to [-0.5, 0.5) turns; the offset keeps the truncating cast a floor.
    let t = t - ((t + 1_048_576.5) as i64 - 1_048_576) as f64;
    let y = 8.0 * t - 16.0 * t * t.abs();
    0.225 * (y * y.abs() - y) + y
}

impl Shape {
    /// Axis-aligned bounds in mm: ([min x, min y, min z], [max x, max y, max z]).
    fn bounds(&self) -> ([f64; 3], [f64; 3]) {
        match self {
            Shape::Blob { c, r, rot, waves } => {
                // Half-extent of the rotated ellipsoid along each patient axis, grown by
                // the largest outward push of the waves.
                let grow = 1.0 + waves.iter().map(|w| w.amp).sum::<f64>();
                let mut e = [0.0; 3];
                for (i, ei) in e.iter_mut().enumerate() {
                    *ei = grow * (0..3).map(|j| (rot[j][i] * r[j]).powi(2)).sum::<f64>().sqrt();
                }
                ([c[0] - e[0], c[1] - e[1], c[2] - e[2]], [c[0] + e[0], c[1] + e[1], c[2] + e[2]])
            }
            Shape::Tube { x0, y0, z0, z1, radius, wander } => {
                let w = wander[0].amp.abs() + wander[1].amp.abs() + radius;
                ([x0 - w, y0 - w, *z0], [x0 + w, y0 + w, *z1])
            }
            Shape::Loop { c, big_r, small_r, .. } => {
                let e = big_r + small_r;
                ([c[0] - e, c[1] - small_r, c[2] - e], [c[0] + e, c[1] + small_r, c[2] + e])
            }
        }
    }

    /// The same shape with its surface moved out by `mm`.
    fn grown(&self, mm: f64) -> Shape {
        match self.clone() {
            Shape::Blob { c, r, rot, waves } => Shape::Blob { c, r: r.map(|v| v + mm), rot, waves },
            Shape::Tube { x0, y0, z0, z1, radius, wander } => {
                Shape::Tube { x0, y0, z0, z1, radius: radius + mm, wander }
            }
            Shape::Loop { c, big_r, small_r, open_angle } => {
                Shape::Loop { c, big_r, small_r: small_r + mm, open_angle }
            }
        }
    }

    /// Depth inside the shape: < 1 inside (0 at the centre), ≥ 1 outside.
    #[inline]
    fn depth(&self, p: [f64; 3]) -> f64 {
        match self {
            Shape::Blob { c, r, rot, waves } => {
                let d = [p[0] - c[0], p[1] - c[1], p[2] - c[2]];
                let q = [
                    (rot[0][0] * d[0] + rot[0][1] * d[1] + rot[0][2] * d[2]) / r[0],
                    (rot[1][0] * d[0] + rot[1][1] * d[1] + rot[1][2] * d[2]) / r[1],
                    (rot[2][0] * d[0] + rot[2][1] * d[1] + rot[2][2] * d[2]) / r[2],
                ];
                let d2 = q[0] * q[0] + q[1] * q[1] + q[2] * q[2];
                let reach: f64 = 1.0 + waves.iter().map(|w| w.amp).sum::<f64>();
                if d2 >= reach * reach {
                    return 2.0;
                }
                let surface = 1.0 + waves[0].at(q) + waves[1].at(q) + waves[2].at(q);
                d2.sqrt() / surface.max(0.2)
            }
            Shape::Tube { x0, y0, z0, z1, radius, wander } => {
                if p[2] < *z0 || p[2] > *z1 {
                    return 2.0;
                }
                let zq = [p[2] / 100.0, 0.0, 0.0];
                let cx = x0 + wander[0].at(zq);
                let cy = y0 + wander[1].at(zq);
                ((p[0] - cx).powi(2) + (p[1] - cy).powi(2)).sqrt() / radius
            }
            Shape::Loop { c, big_r, small_r, open_angle } => {
                let dx = p[0] - c[0];
                let dz = p[2] - c[2];
                // The loop opens towards +X (the patient's left, where the pancreas body runs).
                let angle = dz.atan2(dx).abs();
                if angle < *open_angle {
                    return 2.0;
                }
                let ring = (dx * dx + dz * dz).sqrt() - big_r;
                (ring * ring + (p[1] - c[1]).powi(2)).sqrt() / small_r
            }
        }
    }
}

fn rotation(ax: f64, ay: f64, az: f64) -> [[f64; 3]; 3] {
    let (sx, cx) = ax.sin_cos();
    let (sy, cy) = ay.sin_cos();
    let (sz, cz) = az.sin_cos();
    // Rz * Ry * Rx
    [
        [cz * cy, cz * sy * sx - sz * cx, cz * sy * cx + sz * sx],
        [sz * cy, sz * sy * sx + cz * cx, sz * sy * cx - cz * sx],
        [-sy, cy * sx, cy * cx],
    ]
}

/// An organ to paint: its label, its shape, and how it looks.
struct Organ {
    label: u8,
    shape: Shape,
    /// Native HU and the extra HU at full contrast enhancement.
    hu: f32,
    enhancement: f32,
    /// Kidneys: the medulla (inner part) enhances less than the cortex.
    medulla: bool,
    /// Stomach: gas rises to the top front of the lumen.
    gas_cap: bool,
    /// Thickness of the fat painted around the organ where nothing else is (mm; 0: none).
    fat_mm: f64,
}

fn jitter(rng: &mut impl Rng, v: [f64; 3], mm: f64) -> [f64; 3] {
    [v[0] + rng.random_range(-mm..mm), v[1] + rng.random_range(-mm..mm), v[2] + rng.random_range(-mm..mm)]
}

fn blob(rng: &mut impl Rng, c: [f64; 3], r: [f64; 3], base_rot: [f64; 3], amp: f64) -> Shape {
    let s = |rng: &mut dyn rand::RngCore| rng.random_range(0.85..1.15);
    let tilt = 12f64.to_radians();
    Shape::Blob {
        c: jitter(rng, c, 8.0),
        r: [r[0] * s(rng), r[1] * s(rng), r[2] * s(rng)],
        rot: rotation(
            base_rot[0] + rng.random_range(-tilt..tilt),
            base_rot[1] + rng.random_range(-tilt..tilt),
            base_rot[2] + rng.random_range(-tilt..tilt),
        ),
        waves: [Wave::random(rng, amp), Wave::random(rng, amp), Wave::random(rng, amp)],
    }
}

fn tube(rng: &mut impl Rng, x0: f64, y0: f64, z: (f64, f64), radius: f64) -> Shape {
    let mut wander = [Wave::random(rng, 6.0), Wave::random(rng, 4.0)];
    for w in &mut wander {
        w.dir = [1.0, 0.0, 0.0];
    }
    Shape::Tube {
        x0: x0 + rng.random_range(-4.0..4.0),
        y0: y0 + rng.random_range(-4.0..4.0),
        z0: z.0,
        z1: z.1,
        radius: radius * rng.random_range(0.85..1.15),
        wander,
    }
}

fn organs(rng: &mut impl Rng, keep_gallbladder: bool, fat_planes: bool) -> Vec<Organ> {
    let amp = rng.random_range(0.08..0.18);
    let o = |label: u8, shape: Shape, hu: f32, enhancement: f32| Organ {
        label,
        shape,
        hu,
        enhancement,
        medulla: false,
        gas_cap: false,
        fat_mm: 0.0,
    };
    let fat = |mm: f64| if fat_planes { mm } else { 0.0 };
    // Paint order: later organs win where shapes overlap (small ones last).
    let mut v = vec![
        o(1, blob(rng, [-70.0, -5.0, 70.0], [80.0, 85.0, 85.0], [0.0, 0.0, 0.0], amp), 55.0, 50.0),
        o(3, blob(rng, [85.0, 45.0, 75.0], [35.0, 50.0, 55.0], [0.0, 0.0, 0.3], amp), 45.0, 60.0),
        Organ {
            gas_cap: true,
            ..o(11, blob(rng, [50.0, -35.0, 75.0], [50.0, 40.0, 50.0], [0.0, 0.0, 0.0], amp), 25.0, 20.0)
        },
        Organ {
            medulla: true,
            ..o(2, blob(rng, [-70.0, 55.0, 15.0], [28.0, 30.0, 55.0], [0.0, 0.2, 0.0], amp), 30.0, 150.0)
        },
        Organ {
            medulla: true,
            ..o(13, blob(rng, [70.0, 55.0, 25.0], [28.0, 30.0, 55.0], [0.0, -0.2, 0.0], amp), 30.0, 150.0)
        },
        o(
            12,
            Shape::Loop {
                c: jitter(rng, [-35.0, 5.0, 10.0], 5.0),
                big_r: rng.random_range(28.0..36.0),
                small_r: rng.random_range(9.0..13.0),
                open_angle: 0.9,
            },
            35.0,
            40.0,
        ),
        o(4, blob(rng, [15.0, 5.0, 25.0], [65.0, 13.0, 15.0], [0.0, -0.25, 0.0], amp * 0.7), 40.0, 60.0),
        Organ {
            fat_mm: fat(6.0),
            ..o(7, blob(rng, [-45.0, 45.0, 75.0], [5.0, 12.0, 18.0], [0.0, 0.0, 0.0], amp), 25.0, 30.0)
        },
        Organ {
            fat_mm: fat(6.0),
            ..o(8, blob(rng, [40.0, 40.0, 65.0], [5.0, 12.0, 18.0], [0.0, 0.0, 0.0], amp), 25.0, 30.0)
        },
        o(6, tube(rng, -22.0, 22.0, (-400.0, 110.0), 12.0), 40.0, 100.0),
        o(5, tube(rng, 18.0, 20.0, (-400.0, 400.0), 11.0), 45.0, 220.0),
        Organ {
            fat_mm: fat(4.0),
            ..o(10, tube(rng, 8.0, 28.0, (90.0, 400.0), if fat_planes { 9.0 } else { 7.0 }), 40.0, 10.0)
        },
    ];
    if keep_gallbladder {
        // After the liver, before the vessels: it sits in the liver's underside.
        v.insert(7, o(9, blob(rng, [-55.0, -55.0, 25.0], [16.0, 18.0, 30.0], [0.0, 0.0, 0.0], amp), 8.0, 0.0));
    }
    v
}

/// Maps canonical indices to patient-frame mm and back.
struct Frame {
    n: [usize; 3], // z, y, x
    sp: [f64; 3],  // z, y, x
    lo: [f64; 3],  // mm of index 0, in (x, y, z)
}

impl Frame {
    #[inline]
    fn mm(&self, z: usize, y: usize, x: usize) -> [f64; 3] {
        [self.lo[0] + x as f64 * self.sp[2], self.lo[1] + y as f64 * self.sp[1], self.lo[2] + z as f64 * self.sp[0]]
    }

    /// Index range along canonical axis `axis` (0 = z) covering [lo_mm, hi_mm].
    fn range(&self, axis: usize, lo_mm: f64, hi_mm: f64) -> std::ops::Range<usize> {
        let p = 2 - axis; // patient coordinate index
        let a = ((lo_mm - self.lo[p]) / self.sp[axis]).floor().max(0.0) as usize;
        let b = (((hi_mm - self.lo[p]) / self.sp[axis]).ceil() + 1.0).max(0.0) as usize;
        a.min(self.n[axis])..b.min(self.n[axis])
    }
}

/// Generates one phantom on `grid` from `rng`. `labeled` only decides nothing about
/// the anatomy; it is there so callers can skip label output.
pub fn generate(grid: PhantomGrid, rng: &mut impl Rng) -> Phantom {
    let [nz, ny, nx] = grid.shape;
    let sp = grid.spacing;
    // Where the field of view sits on the body: the table height and the slab.
    let centre = [rng.random_range(-10.0..10.0), rng.random_range(-15.0..5.0), rng.random_range(-30.0..50.0)];
    let frame = Frame {
        n: grid.shape,
        sp,
        lo: [
            centre[0] - (nx as f64 - 1.0) * sp[2] / 2.0,
            centre[1] - (ny as f64 - 1.0) * sp[1] / 2.0,
            centre[2] - (nz as f64 - 1.0) * sp[0] / 2.0,
        ],
    };

    // Body and global appearance of this case.
    let ax = rng.random_range(145.0..185.0);
    let ay = rng.random_range(105.0..135.0);
    let fat = rng.random_range(8.0..30.0);
    let contrast: f32 = rng.random_range(0.0..1.0);
    let hu_offset: f32 = rng.random_range(-10.0..10.0);
    let noise_sd: f32 = rng.random_range(8.0..25.0);
    let spine_y = ay - 45.0;

    let mut hu = Array3::<f32>::zeros((nz, ny, nx));
    let mut labels = Array3::<u8>::zeros((nz, ny, nx));
    {
        let body = Body { ax, ay, fat, spine_y };
        // The bowel mottle is separable: one table per axis instead of two trig calls per voxel.
        let mottle_x: Vec<f64> = (0..nx).map(|x| (frame.mm(0, 0, x)[0] * 0.11).sin()).collect();
        let hu = hu.as_slice_mut().expect("standard layout");
        for z in 0..nz {
            for y in 0..ny {
                let row = &mut hu[(z * ny + y) * nx..(z * ny + y + 1) * nx];
                let p0 = frame.mm(z, y, 0);
                let py = p0[1];
                let mottle_y = (py * 0.13).cos();
                for (x, v) in row.iter_mut().enumerate() {
                    let px = p0[0] + x as f64 * sp[2];
                    *v = body.hu(px, py, mottle_x[x] * mottle_y);
                }
            }
        }
    }

    // Lung bases above the diaphragm, under the organs painted next.
    for side in [-1.0, 1.0] {
        let lung = Shape::Blob {
            c: [side * 80.0, 15.0, 215.0],
            r: [60.0, 75.0, 110.0],
            rot: rotation(0.0, 0.0, 0.0),
            waves: [Wave { dir: [1.0, 0.0, 0.0], k: 0.0, amp: 0.0, phase: 0.0 }; 3],
        };
        paint(&frame, &lung, |z, y, x, _| {
            let i = (z * ny + y) * nx + x;
            hu.as_slice_mut().unwrap()[i] = -850.0;
        });
    }

    let keep_gallbladder = rng.random_bool(0.9);
    for organ in organs(rng, keep_gallbladder, grid.fat_planes) {
        let (hu_s, lab_s) = (hu.as_slice_mut().unwrap(), labels.as_slice_mut().unwrap());
        if organ.fat_mm > 0.0 {
            // Only where no organ is yet: a neighbour painted earlier keeps its voxels.
            paint(&frame, &organ.shape.grown(organ.fat_mm), |z, y, x, _| {
                let i = (z * ny + y) * nx + x;
                if lab_s[i] == 0 {
                    hu_s[i] = -90.0 + hu_offset;
                }
            });
        }
        let base = organ.hu + hu_offset;
        let enh = organ.enhancement * contrast;
        let (cz, cy) = match organ.shape {
            Shape::Blob { c, r, .. } => (c[2] + 0.45 * r[2], c[1] - 0.3 * r[1]),
            _ => (f64::INFINITY, f64::INFINITY),
        };
        paint(&frame, &organ.shape, |z, y, x, depth| {
            let i = (z * ny + y) * nx + x;
            lab_s[i] = organ.label;
            let mut v = base + enh;
            if organ.medulla && depth < 0.55 {
                v = base + 0.35 * enh;
            }
            if organ.gas_cap {
                let p = frame.mm(z, y, x);
                if p[2] > cz && p[1] < cy && depth < 0.9 {
                    v = -900.0;
                }
            }
            hu_s[i] = v;
        });
    }

    // Noise last, and the int16 conversion in the same pass. Samples come from a
    // table of Gaussian draws indexed by 16 random bits: four voxels per RNG call.
    let table: Vec<f32> = (0..1 << 16)
        .map(|_| {
            let n: f32 = StandardNormal.sample(rng);
            noise_sd * n
        })
        .collect();
    let mut image = Array3::<i16>::zeros((nz, ny, nx));
    let out = image.as_slice_mut().expect("standard layout");
    let src = hu.as_slice().expect("standard layout");
    for (o4, v4) in out.chunks_mut(4).zip(src.chunks(4)) {
        let bits = rng.next_u64();
        for (k, (o, &v)) in o4.iter_mut().zip(v4).enumerate() {
            let n = table[((bits >> (16 * k)) & 0xFFFF) as usize];
            // Clamped to ≥ -1024, so the shifted value is positive and `as` rounds down.
            *o = ((v + n).clamp(HU_MIN, HU_MAX) + 2048.5) as i32 as i16 - 2048;
        }
    }

    // Painted in the patient frame (x left, y posterior); the canonical order is RAS.
    let (image, labels) = (left_posterior_to_ras(image), left_posterior_to_ras(labels));
    let ras_layout = rng.random_bool(0.5);
    // Table position in scanner coordinates: anywhere within a few cm.
    let centre_ras = [rng.random_range(-20.0..20.0), rng.random_range(-40.0..40.0), rng.random_range(-800.0..-400.0)];
    let geometry = Geometry::new_with_layout(grid.shape, sp, centre_ras, ras_layout);
    Phantom { image, labels, geometry }
}

fn left_posterior_to_ras<T: Clone>(mut a: Array3<T>) -> Array3<T> {
    a.invert_axis(ndarray::Axis(1));
    a.invert_axis(ndarray::Axis(2));
    a.as_standard_layout().into_owned()
}

/// Air, subcutaneous fat, the muscle wall, abdominal soft tissue and the spine.
struct Body {
    ax: f64,
    ay: f64,
    fat: f64,
    spine_y: f64,
}

impl Body {
    #[inline]
    fn hu(&self, x: f64, y: f64, mottle: f64) -> f32 {
        let r = (x / self.ax).powi(2) + (y / self.ay).powi(2);
        if r > 1.0 {
            return -1000.0;
        }
        // Distance inward from the skin, approximately, in mm.
        let depth = (1.0 - r.sqrt()) * self.ax.min(self.ay);
        if depth < self.fat {
            return -100.0;
        }
        if depth < self.fat + 10.0 {
            return 50.0;
        }
        let dy = y - self.spine_y;
        let d2_spine = x * x + dy * dy;
        if d2_spine < 400.0 {
            return if d2_spine > 256.0 { 700.0 } else { 250.0 };
        }
        let dc = y - self.spine_y - 28.0;
        let d2_canal = x * x + dc * dc;
        if d2_canal < 64.0 {
            return 15.0;
        }
        if d2_canal < 196.0 {
            return 600.0;
        }
        // Paraspinal muscles either side of the spine.
        if (x.abs() - 35.0).abs() < 22.0 && (y - self.spine_y - 20.0).abs() < 22.0 {
            return 55.0;
        }
        // Bowel and mesenteric fat, mottled.
        if mottle > 0.55 {
            return -60.0;
        }
        30.0
    }
}

/// Calls `f(z, y, x, depth)` for every voxel inside `shape`.
fn paint(frame: &Frame, shape: &Shape, mut f: impl FnMut(usize, usize, usize, f64)) {
    let (lo, hi) = shape.bounds();
    if let Shape::Tube { x0, y0, radius, wander, .. } = shape {
        // A tube's centre depends on z alone: find it once per slice and visit only
        // the square around it.
        for z in frame.range(0, lo[2], hi[2]) {
            let zq = [frame.mm(z, 0, 0)[2] / 100.0, 0.0, 0.0];
            let (cx, cy) = (x0 + wander[0].at(zq), y0 + wander[1].at(zq));
            for y in frame.range(1, cy - radius, cy + radius) {
                for x in frame.range(2, cx - radius, cx + radius) {
                    let p = frame.mm(z, y, x);
                    let d = ((p[0] - cx).powi(2) + (p[1] - cy).powi(2)).sqrt() / radius;
                    if d < 1.0 {
                        f(z, y, x, d);
                    }
                }
            }
        }
        return;
    }
    if let Shape::Blob { c, r, rot, waves } = shape {
        // Along a row everything a blob needs is linear in x: step the normalised
        // coordinates and the wave phases instead of recomputing them per voxel.
        let m: [[f64; 3]; 3] = std::array::from_fn(|i| std::array::from_fn(|j| rot[i][j] / r[i]));
        let reach = 1.0 + waves.iter().map(|w| w.amp).sum::<f64>();
        let reach2 = reach * reach;
        let dq: [f64; 3] = std::array::from_fn(|i| m[i][0] * frame.sp[2]);
        let dphase: [f64; 3] =
            std::array::from_fn(|w| waves[w].k * (0..3).map(|i| dq[i] * waves[w].dir[i]).sum::<f64>());
        let xs = frame.range(2, lo[0], hi[0]);
        for z in frame.range(0, lo[2], hi[2]) {
            for y in frame.range(1, lo[1], hi[1]) {
                let p = frame.mm(z, y, xs.start);
                let d = [p[0] - c[0], p[1] - c[1], p[2] - c[2]];
                let mut q: [f64; 3] = std::array::from_fn(|i| m[i][0] * d[0] + m[i][1] * d[1] + m[i][2] * d[2]);
                let mut phase: [f64; 3] = std::array::from_fn(|w| {
                    waves[w].k * (q[0] * waves[w].dir[0] + q[1] * waves[w].dir[1] + q[2] * waves[w].dir[2])
                        + waves[w].phase
                });
                for x in xs.clone() {
                    let d2 = q[0] * q[0] + q[1] * q[1] + q[2] * q[2];
                    if d2 < reach2 {
                        let surface = 1.0
                            + waves[0].amp * fast_sin(phase[0])
                            + waves[1].amp * fast_sin(phase[1])
                            + waves[2].amp * fast_sin(phase[2]);
                        let depth = d2.sqrt() / surface.max(0.2);
                        if depth < 1.0 {
                            f(z, y, x, depth);
                        }
                    }
                    for i in 0..3 {
                        q[i] += dq[i];
                        phase[i] += dphase[i];
                    }
                }
            }
        }
        return;
    }
    for z in frame.range(0, lo[2], hi[2]) {
        for y in frame.range(1, lo[1], hi[1]) {
            for x in frame.range(2, lo[0], hi[0]) {
                let d = shape.depth(frame.mm(z, y, x));
                if d < 1.0 {
                    f(z, y, x, d);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn grid() -> PhantomGrid {
        PhantomGrid { shape: [40, 80, 80], spacing: [7.0, 4.5, 4.5], fat_planes: true }
    }

    #[test]
    fn fast_sin_is_close_to_sin() {
        for i in -2000..2000 {
            let x = i as f64 * 0.013;
            assert!((fast_sin(x) - x.sin()).abs() < 1.2e-3, "{x}");
        }
    }

    #[test]
    fn deterministic_for_a_seed() {
        let a = generate(grid(), &mut rand_pcg::Pcg64Mcg::seed_from_u64(3));
        let b = generate(grid(), &mut rand_pcg::Pcg64Mcg::seed_from_u64(3));
        let c = generate(grid(), &mut rand_pcg::Pcg64Mcg::seed_from_u64(4));
        assert_eq!(a.image, b.image);
        assert_eq!(a.labels, b.labels);
        assert_ne!(a.image, c.image);
    }

    #[test]
    fn every_organ_appears_with_plausible_intensity() {
        let p = generate(grid(), &mut rand_pcg::Pcg64Mcg::seed_from_u64(11));
        let mut count = [0usize; 14];
        let mut sum = [0f64; 14];
        for (&l, &v) in p.labels.iter().zip(p.image.iter()) {
            count[l as usize] += 1;
            sum[l as usize] += v as f64;
        }
        for organ in 1..=13 {
            if organ == 9 && count[9] == 0 {
                continue; // gallbladder may be absent (10% of cases)
            }
            assert!(count[organ] > 0, "organ {organ} missing: {count:?}");
            let mean = sum[organ] / count[organ] as f64;
            if organ != 11 {
                // The stomach holds gas; the others are soft tissue, enhanced or not.
                assert!((-40.0..350.0).contains(&mean), "organ {organ} mean HU {mean}");
            }
        }
        // Liver is the largest organ, adrenals the smallest.
        assert!(count[1] > count[3] && count[1] > count[7] * 20, "{count:?}");
        // Air outside the body.
        assert!(p.image[[20, 0, 0]] < -900);
    }
}

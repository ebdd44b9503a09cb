//! Voxel-to-world geometry of NIfTI files, and the canonical axis order used for processing.
//!
//! NIfTI's world space is RAS+ (x to the patient's right, y anterior, z superior).
//! Which transform is in effect follows nibabel and ITK: the sform when its code is
//! above 0, else the qform (with its qfac), else the bare pixdim scaling.
//!
//! Every volume is processed in one **canonical** array order, `[z][y][x]` in memory
//! (x fastest), with x pointing to the patient's right, y anterior and z superior:
//! nibabel's closest canonical (RAS+) orientation, transposed to (z, y, x). That is
//! exactly the array nnU-Net's `NibabelIOWithReorient` reader hands its networks, so a
//! network trained here predicts correctly inside nnU-Net for any file orientation
//! (its default `SimpleITKIO` keeps the file's voxel order instead). Patch sizes and
//! spacings are always given in that (z, y, x) order, as nnU-Net does.

use nifti::NiftiHeader;

/// The canonical orientation's name (nibabel's axis codes of the canonical x, y, z).
pub const CANONICAL: &str = "RAS";

/// A 4×4 homogeneous matrix mapping voxel indices to world millimetres (RAS+).
pub type Affine = [[f64; 4]; 4];

/// Which header fields gave the affine in effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AffineSource {
    Sform,
    Qform,
    /// Neither transform was set: the spacing alone, origin at 0.
    Pixdim,
}

pub fn identity() -> Affine {
    let mut a = [[0.0; 4]; 4];
    for (i, row) in a.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    a
}

pub fn matmul(a: &Affine, b: &Affine) -> Affine {
    let mut out = [[0.0; 4]; 4];
    for (i, row) in out.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = (0..4).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    out
}

/// World coordinates of a (possibly fractional) voxel index.
pub fn apply(a: &Affine, p: [f64; 3]) -> [f64; 3] {
    let mut out = [0.0; 3];
    for (i, v) in out.iter_mut().enumerate() {
        *v = a[i][0] * p[0] + a[i][1] * p[1] + a[i][2] * p[2] + a[i][3];
    }
    out
}

/// Inverse of an affine whose linear part is invertible.
pub fn invert(a: &Affine) -> Option<Affine> {
    let m = |r: usize, c: usize| a[r][c];
    let det = m(0, 0) * (m(1, 1) * m(2, 2) - m(1, 2) * m(2, 1)) - m(0, 1) * (m(1, 0) * m(2, 2) - m(1, 2) * m(2, 0))
        + m(0, 2) * (m(1, 0) * m(2, 1) - m(1, 1) * m(2, 0));
    // Degenerate when the axes span no volume relative to their lengths (a plain
    // threshold on the determinant would call 0.1 µm voxels singular).
    let lengths: f64 = column_norms(a).iter().product();
    if det.abs() <= 1e-6 * lengths || !det.is_finite() {
        return None;
    }
    let mut inv = identity();
    let cof = |r0: usize, r1: usize, c0: usize, c1: usize| m(r0, c0) * m(r1, c1) - m(r0, c1) * m(r1, c0);
    inv[0][0] = cof(1, 2, 1, 2) / det;
    inv[0][1] = -cof(0, 2, 1, 2) / det;
    inv[0][2] = cof(0, 1, 1, 2) / det;
    inv[1][0] = -cof(1, 2, 0, 2) / det;
    inv[1][1] = cof(0, 2, 0, 2) / det;
    inv[1][2] = -cof(0, 1, 0, 2) / det;
    inv[2][0] = cof(1, 2, 0, 1) / det;
    inv[2][1] = -cof(0, 2, 0, 1) / det;
    inv[2][2] = cof(0, 1, 0, 1) / det;
    for r in 0..3 {
        inv[r][3] = -(0..3).map(|k| inv[r][k] * a[k][3]).sum::<f64>();
    }
    Some(inv)
}

/// Voxel sizes a scan can have, in mm: from 0.1 µm (finer than any light microscope)
/// to 10 m. Outside, a header is a units or writing error, and resampling it to a plan's
/// spacing would ask for absurd shapes (1e30 mm: more voxels than memory can count).
pub const VOXEL_SIZE_MM: (f64, f64) = (1e-4, 1e4);

/// Why these voxel sizes (any axis order) are no scan's, or None: outside [`VOXEL_SIZE_MM`].
pub fn voxel_size_problem(spacing: &[f64]) -> Option<String> {
    let (lo, hi) = VOXEL_SIZE_MM;
    // Headers hold float32: the ends themselves, rounded to it, still pass.
    let bad = spacing.iter().find(|&&s| !(lo * (1.0 - 1e-6)..=hi * (1.0 + 1e-6)).contains(&s))?;
    // As the header holds it (float32), without float64's extra digits.
    let bad = *bad as f32;
    Some(format!("voxel size {bad:e} mm is outside {lo:e}..{hi:e} mm, no scan's (a units or writing error?)"))
}

/// Length of each voxel axis (the column norms of the linear part).
pub fn column_norms(a: &Affine) -> [f64; 3] {
    let mut out = [0.0; 3];
    for (c, v) in out.iter_mut().enumerate() {
        *v = (0..3).map(|r| a[r][c] * a[r][c]).sum::<f64>().sqrt();
    }
    out
}

pub fn max_abs_diff(a: &Affine, b: &Affine) -> f64 {
    let mut d: f64 = 0.0;
    for r in 0..4 {
        for c in 0..4 {
            d = d.max((a[r][c] - b[r][c]).abs());
        }
    }
    d
}

pub fn sform_affine(h: &NiftiHeader) -> Affine {
    let rows = [h.srow_x, h.srow_y, h.srow_z];
    let mut a = identity();
    for r in 0..3 {
        for c in 0..4 {
            a[r][c] = rows[r][c] as f64;
        }
    }
    a
}

/// The qform as the NIfTI-1 standard defines it: a rotation from the quaternion
/// (b, c, d), pixdim scaling, qfac (pixdim\[0\] < 0 flips the third axis) and the offset.
pub fn qform_affine(h: &NiftiHeader) -> Affine {
    let (b, c, d) = (h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64);
    let a = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
    let rot = [
        [a * a + b * b - c * c - d * d, 2.0 * (b * c - a * d), 2.0 * (b * d + a * c)],
        [2.0 * (b * c + a * d), a * a + c * c - b * b - d * d, 2.0 * (c * d - a * b)],
        [2.0 * (b * d - a * c), 2.0 * (c * d + a * b), a * a + d * d - c * c - b * b],
    ];
    let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
    let scale = [h.pixdim[1] as f64, h.pixdim[2] as f64, h.pixdim[3] as f64 * qfac];
    let offset = [h.quatern_x as f64, h.quatern_y as f64, h.quatern_z as f64];
    let mut m = identity();
    for r in 0..3 {
        for c in 0..3 {
            m[r][c] = rot[r][c] * scale[c];
        }
        m[r][3] = offset[r];
    }
    m
}

pub fn pixdim_affine(h: &NiftiHeader) -> Affine {
    let mut a = identity();
    for i in 0..3 {
        let s = h.pixdim[i + 1] as f64;
        a[i][i] = if s > 0.0 { s } else { 1.0 };
    }
    a
}

/// The affine in effect, as nibabel and ITK choose it.
pub fn effective_affine(h: &NiftiHeader) -> (Affine, AffineSource) {
    if h.sform_code > 0 {
        (sform_affine(h), AffineSource::Sform)
    } else if h.qform_code > 0 {
        (qform_affine(h), AffineSource::Qform)
    } else {
        (pixdim_affine(h), AffineSource::Pixdim)
    }
}

/// Quaternion parameters (b, c, d), qfac and spacing that represent an affine's
/// linear part as well as a qform can (the NIfTI reference algorithm: orthogonalise,
/// take qfac from the determinant, then the quaternion of the rotation).
pub fn affine_to_quatern(a: &Affine) -> ([f64; 3], f64, [f64; 3]) {
    let spacing = column_norms(a);
    let mut r = [[0.0; 3]; 3];
    for c in 0..3 {
        let n = if spacing[c] > 0.0 { spacing[c] } else { 1.0 };
        for (row, rr) in r.iter_mut().enumerate() {
            rr[c] = a[row][c] / n;
        }
    }
    r = orthonormalise(r);
    let det = r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1]) - r[0][1] * (r[1][0] * r[2][2] - r[1][2] * r[2][0])
        + r[0][2] * (r[1][0] * r[2][1] - r[1][1] * r[2][0]);
    let qfac = if det < 0.0 {
        for row in r.iter_mut() {
            row[2] = -row[2];
        }
        -1.0
    } else {
        1.0
    };
    // Shepperd's method: pick the numerically largest of the four candidates.
    let trace = r[0][0] + r[1][1] + r[2][2];
    let (qa, qb, qc, qd);
    if trace > 0.0 {
        let s = (trace + 1.0).sqrt() * 2.0;
        qa = 0.25 * s;
        qb = (r[2][1] - r[1][2]) / s;
        qc = (r[0][2] - r[2][0]) / s;
        qd = (r[1][0] - r[0][1]) / s;
    } else if r[0][0] > r[1][1] && r[0][0] > r[2][2] {
        let s = (1.0 + r[0][0] - r[1][1] - r[2][2]).sqrt() * 2.0;
        qa = (r[2][1] - r[1][2]) / s;
        qb = 0.25 * s;
        qc = (r[0][1] + r[1][0]) / s;
        qd = (r[0][2] + r[2][0]) / s;
    } else if r[1][1] > r[2][2] {
        let s = (1.0 + r[1][1] - r[0][0] - r[2][2]).sqrt() * 2.0;
        qa = (r[0][2] - r[2][0]) / s;
        qb = (r[0][1] + r[1][0]) / s;
        qc = 0.25 * s;
        qd = (r[1][2] + r[2][1]) / s;
    } else {
        let s = (1.0 + r[2][2] - r[0][0] - r[1][1]).sqrt() * 2.0;
        qa = (r[1][0] - r[0][1]) / s;
        qb = (r[0][2] + r[2][0]) / s;
        qc = (r[1][2] + r[2][1]) / s;
        qd = 0.25 * s;
    }
    // The qform stores only b, c, d and takes a ≥ 0.
    let sign = if qa < 0.0 { -1.0 } else { 1.0 };
    ([qb * sign, qc * sign, qd * sign], qfac, spacing)
}

fn orthonormalise(mut r: [[f64; 3]; 3]) -> [[f64; 3]; 3] {
    // Gram-Schmidt on the columns, in order.
    let col = |r: &[[f64; 3]; 3], c: usize| [r[0][c], r[1][c], r[2][c]];
    for c in 0..3 {
        let mut v = col(&r, c);
        for p in 0..c {
            let u = col(&r, p);
            let dot: f64 = (0..3).map(|i| v[i] * u[i]).sum();
            for i in 0..3 {
                v[i] -= dot * u[i];
            }
        }
        let n = (v.iter().map(|x| x * x).sum::<f64>()).sqrt();
        if n > 1e-12 {
            for (i, row) in r.iter_mut().enumerate() {
                row[c] = v[i] / n;
            }
        }
    }
    r
}

/// How a file's voxel axes map onto the canonical `[z][y][x]` order.
///
/// Canonical axis `c` (0 = z, 1 = y, 2 = x) is file axis `file_axis[c]`, reversed
/// when `flip[c]` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Orientation {
    pub file_axis: [usize; 3],
    pub flip: [bool; 3],
}

impl Orientation {
    /// nibabel's `io_orientation`, so that the canonical array is exactly the one
    /// `as_closest_canonical` (and nnU-Net's `NibabelIOWithReorient`) gives: the
    /// direction cosines (columns scaled to unit length) replaced by the nearest
    /// rotation (the polar factor, nibabel's SVD `U·Vᵀ`), then file axes in order, each
    /// taking the world axis of its largest remaining component (the first on a tie),
    /// flipped so that canonical x points right, y anterior and z superior (RAS+).
    pub fn from_affine(a: &Affine) -> Orientation {
        let mut r = [[0.0f64; 3]; 3];
        for f in 0..3 {
            let norm = (0..3).map(|w| a[w][f] * a[w][f]).sum::<f64>().sqrt();
            let norm = if norm == 0.0 { 1.0 } else { norm };
            for w in 0..3 {
                r[w][f] = a[w][f] / norm;
            }
        }
        let mut r = polar_rotation(r).unwrap_or(r);
        let mut file_axis = [0usize; 3];
        let mut flip = [false; 3];
        let mut used = [false; 3];
        for f in 0..3 {
            let mut best = None;
            for w in 0..3 {
                if !used[w] && best.is_none_or(|b: usize| r[w][f].abs() > r[b][f].abs()) {
                    best = Some(w);
                }
            }
            let w = best.expect("a world axis is left for every file axis");
            used[w] = true;
            let canonical = 2 - w; // world x -> canonical x (index 2), world z -> canonical z (0)
            file_axis[canonical] = f;
            flip[canonical] = r[w][f] < 0.0;
            r[w] = [0.0; 3];
        }
        Orientation { file_axis, flip }
    }

    pub fn is_identity_order(&self) -> bool {
        self.file_axis == [0, 1, 2] && self.flip == [false; 3]
    }

    /// Canonical shape `[z, y, x]` for a file shape.
    pub fn canonical_shape(&self, file_shape: [usize; 3]) -> [usize; 3] {
        [file_shape[self.file_axis[0]], file_shape[self.file_axis[1]], file_shape[self.file_axis[2]]]
    }

    /// Affine from canonical indices `(z, y, x)` to the file's voxel indices.
    pub fn canonical_to_file(&self, file_shape: [usize; 3]) -> Affine {
        let mut m = [[0.0; 4]; 4];
        m[3][3] = 1.0;
        for c in 0..3 {
            let f = self.file_axis[c];
            if self.flip[c] {
                m[f][c] = -1.0;
                m[f][3] = file_shape[f] as f64 - 1.0;
            } else {
                m[f][c] = 1.0;
            }
        }
        m
    }
}

/// The orthogonal polar factor of `m` (its nearest rotation or reflection): Newton's
/// iteration `X ← (X + X⁻ᵀ)/2`, which converges quadratically for invertible `m`.
/// `None` for a (nearly) singular `m`.
fn polar_rotation(m: [[f64; 3]; 3]) -> Option<[[f64; 3]; 3]> {
    let mut x = m;
    for _ in 0..100 {
        let mut a4 = identity();
        for i in 0..3 {
            a4[i][..3].copy_from_slice(&x[i]);
        }
        let inv = invert(&a4)?;
        let next: [[f64; 3]; 3] = std::array::from_fn(|i| std::array::from_fn(|j| 0.5 * (x[i][j] + inv[j][i])));
        let change = (0..3).flat_map(|i| (0..3).map(move |j| (i, j))).map(|(i, j)| (next[i][j] - x[i][j]).abs());
        let done = change.fold(0.0, f64::max) < 1e-14;
        x = next;
        if done {
            break;
        }
    }
    Some(x)
}

/// The three letters nibabel's `aff2axcodes` gives (the direction each file axis
/// increases towards), e.g. "RAS", "LPS", "LAS".
pub fn axis_codes(a: &Affine) -> String {
    let o = Orientation::from_affine(a);
    let mut codes = ['?'; 3];
    for c in 0..3 {
        let f = o.file_axis[c];
        let w = 2 - c;
        let positive = a[w][f] > 0.0;
        codes[f] = match (w, positive) {
            (0, true) => 'R',
            (0, false) => 'L',
            (1, true) => 'A',
            (1, false) => 'P',
            (2, true) => 'S',
            _ => 'I',
        };
    }
    codes.iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diag(x: f64, y: f64, z: f64) -> Affine {
        let mut a = identity();
        a[0][0] = x;
        a[1][1] = y;
        a[2][2] = z;
        a
    }

    #[test]
    fn ras_and_lps_codes_and_orientation() {
        assert_eq!(axis_codes(&diag(1.0, 1.0, 2.0)), "RAS");
        assert_eq!(axis_codes(&diag(-1.0, -1.0, 2.0)), "LPS");
        assert_eq!(axis_codes(&diag(-1.0, 1.0, 2.0)), "LAS");
        let ras = Orientation::from_affine(&diag(1.0, 1.0, 2.0));
        assert_eq!(ras.file_axis, [2, 1, 0]);
        assert_eq!(ras.flip, [false, false, false]);
        let lps = Orientation::from_affine(&diag(-1.0, -1.0, 2.0));
        assert_eq!(lps.flip, [false, true, true]);
    }

    #[test]
    fn permuted_axes_are_found() {
        // File axis 0 runs superior, axis 1 left, axis 2 anterior.
        let mut a = [[0.0; 4]; 4];
        a[3][3] = 1.0;
        a[2][0] = 2.5;
        a[0][1] = -0.8;
        a[1][2] = 0.8;
        assert_eq!(axis_codes(&a), "SLA");
        let o = Orientation::from_affine(&a);
        assert_eq!(o.file_axis, [0, 2, 1]);
        assert_eq!(o.flip, [false, false, true]);
    }

    #[test]
    fn oblique_axes_follow_nibabels_io_orientation() {
        // Expected values from nibabel 5.4.2's io_orientation on the same affines.
        // File axis 0 at 60° from world x towards y, axis 1 at 60° from y towards −x:
        // [[1, 1], [0, −1], [2, 1]].
        let (s, c) = (60f64.to_radians().sin(), 60f64.to_radians().cos());
        let mut a = identity();
        a[0][0] = c;
        a[1][0] = s;
        a[0][1] = -s;
        a[1][1] = c;
        let o = Orientation::from_affine(&a);
        // File axis 0 is mostly world y (+), so canonical y; axis 1 mostly world x (−), flipped.
        assert_eq!(o.file_axis, [2, 0, 1]);
        assert_eq!(o.flip, [false, false, true]);
        // Exactly 45°: a tie, settled by the first world axis as numpy's argmax does.
        let h = 0.5f64.sqrt();
        let mut b = identity();
        b[0][0] = h;
        b[1][0] = h;
        b[0][1] = -h;
        b[1][1] = h;
        let o = Orientation::from_affine(&b);
        assert_eq!(o.file_axis, [2, 1, 0], "file axis 0 takes world x on the tie: [[0, 1], [1, 1], [2, 1]]");
        // Non-orthogonal columns (0.71, 0.70, 0) and (0.75, −0.66, 0): their polar factor
        // sends file axis 0 to y and 1 to x, [[1, 1], [0, 1], [2, 1]].
        let mut m = identity();
        (m[0][0], m[1][0], m[0][1], m[1][1], m[2][2]) = (0.71, 0.70, 0.75, -0.66, 2.5);
        let o = Orientation::from_affine(&m);
        assert_eq!(o.file_axis, [2, 0, 1]);
        assert_eq!(o.flip, [false, false, false]);
    }

    #[test]
    fn invert_round_trips() {
        let mut a = diag(0.8, -0.7, 2.5);
        a[0][1] = 0.1;
        a[0][3] = 12.0;
        a[1][3] = -40.0;
        a[2][3] = 7.5;
        let inv = invert(&a).unwrap();
        let id = matmul(&a, &inv);
        assert!(max_abs_diff(&id, &identity()) < 1e-12);
    }

    #[test]
    fn quaternion_round_trip_with_negative_qfac() {
        // A rotation about z by 30 degrees, then a flipped third axis.
        let (s, c) = (30f64.to_radians().sin(), 30f64.to_radians().cos());
        let mut a = identity();
        a[0][0] = c * 0.7;
        a[0][1] = -s * 0.9;
        a[1][0] = s * 0.7;
        a[1][1] = c * 0.9;
        a[2][2] = -3.0;
        a[0][3] = 5.0;
        let (q, qfac, spacing) = affine_to_quatern(&a);
        assert_eq!(qfac, -1.0);
        let mut h = NiftiHeader {
            quatern_b: q[0] as f32,
            quatern_c: q[1] as f32,
            quatern_d: q[2] as f32,
            quatern_x: 5.0,
            ..NiftiHeader::default()
        };
        h.pixdim = [qfac as f32, spacing[0] as f32, spacing[1] as f32, spacing[2] as f32, 0.0, 0.0, 0.0, 0.0];
        let back = qform_affine(&h);
        assert!(max_abs_diff(&back, &a) < 1e-5, "{back:?} vs {a:?}");
    }
}

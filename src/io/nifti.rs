//! Reading and writing NIfTI-1 volumes (`.nii`, `.nii.gz`) in the canonical array order.
//!
//! Reading keeps the file's header so that anything written back "like" it (a label
//! map predicted for an image, say) lands on exactly the same grid.

use std::path::{Path, PathBuf};

use ndarray::{Array3, ArrayView3, Axis, Ix3};
use nifti::writer::WriterOptions;
use nifti::{DataElement, IntoNdArray, NiftiHeader, NiftiType};

use super::geometry::{self, Affine, AffineSource, Orientation};
use crate::error::{Error, Result};

/// Where a volume's voxels sit in the world, and how to get back to the file's layout.
#[derive(Debug, Clone)]
pub struct Geometry {
    /// The file's own header, kept whole so that exports reproduce it.
    pub header: NiftiHeader,
    /// Shape in the file's axis order (i, j, k).
    pub file_shape: [usize; 3],
    /// Voxel (i, j, k) to RAS+ millimetres: the transform in effect.
    pub file_affine: Affine,
    pub source: AffineSource,
    pub orientation: Orientation,
}

impl Geometry {
    /// Geometry of a header, validating what processing relies on.
    pub fn from_header(path: &Path, header: NiftiHeader) -> Result<Geometry> {
        let dim = header.dim().map_err(|e| Error::invalid(path, format!("bad dimensions in header: {e}")))?;
        let file_shape = match dim.len() {
            3 => [dim[0] as usize, dim[1] as usize, dim[2] as usize],
            4 if dim[3] == 1 => [dim[0] as usize, dim[1] as usize, dim[2] as usize],
            2 => [dim[0] as usize, dim[1] as usize, 1],
            n => {
                return Err(Error::invalid(
                    path,
                    format!("expected a 3D volume, the header says {n}D with dim {dim:?}"),
                ));
            }
        };
        let (file_affine, source) = geometry::effective_affine(&header);
        if source == AffineSource::Pixdim {
            // Without a transform the voxel size is pixdim alone; a 0 or negative one used to
            // become 1 mm silently. (The axes a 2D image lacks keep 1 mm.)
            for a in 0..dim.len().min(3) {
                let v = header.pixdim[a + 1];
                if !(v > 0.0 && v.is_finite()) {
                    return Err(Error::invalid(
                        path,
                        format!(
                            "pixdim[{}] = {v}: voxel sizes must be positive, and the header has no sform or qform \
                             (both codes 0) to take them from",
                            a + 1
                        ),
                    ));
                }
            }
        }
        if file_affine.iter().flatten().any(|v| !v.is_finite()) {
            return Err(Error::invalid(path, format!("{source:?} affine has non-finite entries")));
        }
        let spacing = geometry::column_norms(&file_affine);
        if spacing.iter().any(|&s| s <= 0.0 || !s.is_finite()) || geometry::invert(&file_affine).is_none() {
            return Err(Error::invalid(path, format!("{source:?} affine is singular (voxel sizes {spacing:?} mm)")));
        }
        if let Some(problem) = geometry::voxel_size_problem(&spacing) {
            return Err(Error::invalid(
                path,
                format!(
                    "{problem}: the {} gives voxel sizes {:?} mm along the file's axes i, j, k",
                    format!("{source:?}").to_lowercase(),
                    spacing.map(|v| v as f32)
                ),
            ));
        }
        let orientation = Orientation::from_affine(&file_affine);
        Ok(Geometry { header, file_shape, file_affine, source, orientation })
    }

    /// Shape in canonical `[z, y, x]` order.
    pub fn shape(&self) -> [usize; 3] {
        self.orientation.canonical_shape(self.file_shape)
    }

    /// Canonical voxel `(z, y, x)` to RAS+ millimetres.
    pub fn affine(&self) -> Affine {
        geometry::matmul(&self.file_affine, &self.orientation.canonical_to_file(self.file_shape))
    }

    /// Voxel size in mm along canonical (z, y, x).
    pub fn spacing(&self) -> [f64; 3] {
        geometry::column_norms(&self.affine())
    }

    /// nibabel-style axis codes of the file ("RAS", "LPS", ...).
    pub fn axis_codes(&self) -> String {
        geometry::axis_codes(&self.file_affine)
    }

    pub fn datatype(&self) -> Option<NiftiType> {
        self.header.data_type().ok()
    }

    pub fn voxel_count(&self) -> usize {
        self.file_shape.iter().product()
    }

    /// A geometry for new data, with file axes (i, j, k) along (x, y, z) and laid out
    /// "RAS" (i towards the patient's right, j anterior) or "LPS" (left, posterior),
    /// k superior in both; the volume's centre sits at `centre_ras` (mm).
    /// The phantom generator writes both layouts, as real datasets mix them.
    pub fn new_with_layout(
        canonical_shape: [usize; 3],
        spacing_zyx: [f64; 3],
        centre_ras: [f64; 3],
        ras_layout: bool,
    ) -> Geometry {
        let [nz, ny, nx] = canonical_shape;
        let file_shape = [nx, ny, nz];
        let mut a = geometry::identity();
        let sign = if ras_layout { 1.0 } else { -1.0 };
        a[0][0] = sign * spacing_zyx[2];
        a[1][1] = sign * spacing_zyx[1];
        a[2][2] = spacing_zyx[0];
        for r in 0..3 {
            a[r][3] = centre_ras[r] - a[r][r] * (file_shape[r] as f64 - 1.0) / 2.0;
        }
        let mut header = NiftiHeader { xyzt_units: 2 | 8, ..NiftiHeader::default() }; // mm, seconds
        set_both_transforms(&mut header, &a, 1);
        Geometry {
            header,
            file_shape,
            file_affine: a,
            source: AffineSource::Sform,
            orientation: Orientation::from_affine(&a),
        }
    }
}

/// Writes the affine as sform and as qform (the same transform), with the given code.
fn set_both_transforms(h: &mut NiftiHeader, a: &Affine, code: i16) {
    for c in 0..4 {
        h.srow_x[c] = a[0][c] as f32;
        h.srow_y[c] = a[1][c] as f32;
        h.srow_z[c] = a[2][c] as f32;
    }
    h.sform_code = code;
    set_qform(h, a, code);
}

fn set_qform(h: &mut NiftiHeader, a: &Affine, code: i16) {
    let (q, qfac, spacing) = geometry::affine_to_quatern(a);
    h.quatern_b = q[0] as f32;
    h.quatern_c = q[1] as f32;
    h.quatern_d = q[2] as f32;
    h.quatern_x = a[0][3] as f32;
    h.quatern_y = a[1][3] as f32;
    h.quatern_z = a[2][3] as f32;
    h.pixdim[0] = qfac as f32;
    for i in 0..3 {
        h.pixdim[i + 1] = spacing[i] as f32;
    }
    h.qform_code = code;
}

/// A volume in canonical `[z, y, x]` order with the geometry of the file it came from.
#[derive(Debug, Clone)]
pub struct Volume<T> {
    pub data: Array3<T>,
    pub geometry: Geometry,
}

pub fn read_header(path: &Path) -> Result<Geometry> {
    let len = check_regular_file(path)?;
    let header = guarded(path, || NiftiHeader::from_file(path).map_err(|e| Error::nifti(path, e)))?;
    validate_header(path, &header, len)?;
    Geometry::from_header(path, header)
}

/// The file's length, if it is a regular file (links followed). Checked before opening: a FIFO
/// named like a case file would block the reader forever.
pub fn check_regular_file(path: &Path) -> Result<u64> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(m.len()),
        Ok(m) => Err(Error::invalid(path, format!("not a regular file ({})", super::file_kind(&m.file_type())))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && path.symlink_metadata().is_ok() => {
            let target = std::fs::read_link(path).map(|t| t.display().to_string()).unwrap_or_default();
            Err(Error::invalid(path, format!("a dangling symbolic link (to {target})")))
        }
        Err(e) => Err(Error::nifti(path, nifti::NiftiError::Io(e))),
    }
}

/// Runs a step of the nifti crate, turning a panic inside it into an error naming the file,
/// so that one malformed file does not take its worker (and every later file) down.
fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = cps3d_actors::pool::panic_message(panic.as_ref());
        Err(Error::invalid(path, format!("malformed NIfTI: the reader failed ({what})")))
    })
}

/// Voxel types the pipeline reads.
fn supported(t: NiftiType) -> bool {
    matches!(
        t,
        NiftiType::Uint8
            | NiftiType::Int8
            | NiftiType::Int16
            | NiftiType::Uint16
            | NiftiType::Int32
            | NiftiType::Uint32
            | NiftiType::Float32
            | NiftiType::Float64
    )
}

/// gzip cannot shrink data more than about 1032:1; a header wanting more voxel bytes than that
/// from its file is truncated (or lies), whatever the stream holds.
const MAX_GZIP_RATIO: u64 = 1032;

/// Checks what the nifti crate trusts (it panics or over-allocates otherwise): dimensions,
/// datatype and bitpix agreeing, the data offset, the size against the file's length, and
/// finite intensity scaling. `file_len` is the length on disk.
/// Where a single file's voxels start: `vox_offset`, or right after the header when it is
/// 0 (a common "unset"), as nibabel reads it.
fn data_offset(h: &NiftiHeader) -> u64 {
    (h.vox_offset as u64).max(352)
}

/// The voxel bytes the header's dimensions and datatype describe (`None`: they overflow).
fn voxel_bytes(h: &NiftiHeader) -> Option<u64> {
    let ndim = (h.dim[0] as usize).clamp(1, 7);
    let voxels = h.dim[1..=ndim].iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
    voxels.and_then(|n| n.checked_mul(h.data_type().ok()?.size_of() as u64))
}

fn validate_header(path: &Path, h: &NiftiHeader, file_len: u64) -> Result<()> {
    let bad = |m: String| Err(Error::invalid(path, m));
    let raw_dim = h.dim;
    let ndim = raw_dim[0] as i16;
    if !(1..=7).contains(&ndim) {
        return bad(format!("dim[0] = {ndim}: the number of dimensions must be 1 to 7"));
    }
    for (i, &d) in raw_dim.iter().enumerate().take(ndim as usize + 1).skip(1) {
        if (d as i16) < 1 {
            return bad(format!("dim[{i}] = {}: every dimension must be at least 1 (dim {raw_dim:?})", d as i16));
        }
    }
    let Ok(datatype) = h.data_type() else {
        return bad(format!("unknown datatype code {}", h.datatype));
    };
    if !supported(datatype) {
        return bad(format!("unsupported voxel type {datatype:?} (datatype {})", h.datatype));
    }
    let bits = 8 * datatype.size_of();
    if i64::from(h.bitpix) != bits as i64 {
        return bad(format!(
            "bitpix {} disagrees with datatype {} ({datatype:?}, {bits} bits per voxel): corrupt header",
            h.bitpix, h.datatype
        ));
    }
    if h.scl_slope != 0.0 && !(h.scl_slope.is_finite() && h.scl_inter.is_finite()) {
        return bad(format!(
            "scl_slope {} / scl_inter {}: intensity scaling must be finite (it would make every voxel non-finite)",
            h.scl_slope, h.scl_inter
        ));
    }
    // nnU-Net layout names .nii and .nii.gz files: single-file NIfTI-1. A pair's header
    // (`ni1`) would send the reader to a sibling .img, read without its offset.
    if &h.magic != b"n+1\0" {
        let magic = String::from_utf8_lossy(&h.magic[..3]).into_owned();
        return bad(format!(
            "magic \"{magic}\" where a .nii file has \"n+1\"{}: convert it to a single .nii.gz (e.g. with nibabel)",
            if magic == "ni1" { " (a .hdr/.img pair's header)" } else { "" }
        ));
    }
    // 0 is a common "unset", which the reader (like nibabel) takes as right after the header.
    let offset_ok = h.vox_offset == 0.0 || (h.vox_offset.is_finite() && h.vox_offset >= 352.0);
    if !offset_ok {
        return bad(format!("vox_offset {}: voxel data must start at or after the 352-byte header", h.vox_offset));
    }
    let offset = data_offset(h);
    let Some(bytes) = voxel_bytes(h) else {
        return bad(format!("dim {:?} is too large", &raw_dim[1..=ndim as usize]));
    };
    let gz = path.to_string_lossy().ends_with(".gz");
    let needed = bytes.saturating_add(offset);
    if !gz && needed > file_len {
        return bad(format!(
            "file is truncated: dim {:?} at {bits} bits per voxel from offset {offset} needs {needed} bytes, the file \
             has {file_len}",
            &raw_dim[1..=ndim as usize]
        ));
    }
    if gz && bytes / MAX_GZIP_RATIO > file_len {
        return bad(format!(
            "file is truncated: dim {:?} at {bits} bits per voxel needs {bytes} bytes, more than {file_len} bytes of \
             gzip can hold",
            &raw_dim[1..=ndim as usize]
        ));
    }
    Ok(())
}

/// The voxel bytes of a single-file NIfTI (`n+1`), read as nibabel reads them: from
/// `vox_offset` (352 when 0), whatever lies between the header and it (extensions or
/// padding), and for `.nii.gz` every gzip member to its end, so that each member's CRC32
/// and length are checked. Returns the header found in the file and the voxel bytes.
fn read_single_file_voxels(path: &Path, voxel_bytes: usize) -> Result<(NiftiHeader, Vec<u8>)> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| Error::nifti(path, nifti::NiftiError::Io(e)))?;
    let mut bytes = Vec::new();
    let gz = path.to_string_lossy().ends_with(".gz");
    if gz {
        flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file)).read_to_end(&mut bytes).map_err(
            |e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => Error::nifti(path, nifti::NiftiError::Io(e)),
                _ => Error::invalid(path, format!("corrupt gzip stream ({e}): the file is damaged")),
            },
        )?;
    } else {
        std::io::BufReader::new(file)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::nifti(path, nifti::NiftiError::Io(e)))?;
    }
    let header = NiftiHeader::from_reader(&bytes[..]).map_err(|e| Error::nifti(path, e))?;
    let offset = data_offset(&header) as usize;
    let end = offset.saturating_add(voxel_bytes);
    if end > bytes.len() {
        return Err(Error::invalid(
            path,
            format!(
                "vox_offset {offset} + {voxel_bytes} voxel bytes ends at byte {end}, past the end of the data ({} bytes{})",
                bytes.len(),
                if gz { " uncompressed" } else { "" }
            ),
        ));
    }
    bytes.truncate(end);
    bytes.drain(..offset);
    Ok((header, bytes))
}

fn read_file_order_f32(path: &Path) -> Result<(Array3<f32>, Geometry)> {
    let geometry = read_header(path)?;
    // Validated by read_header: a single file whose size does not overflow.
    let bytes = voxel_bytes(&geometry.header).unwrap_or(0) as usize;
    let (header, raw) = read_single_file_voxels(path, bytes)?;
    let volume =
        guarded(path, || nifti::InMemNiftiVolume::from_raw_data(&header, raw).map_err(|e| Error::nifti(path, e)))?;
    let obj = (header, volume);
    // The header read again with the data must be the one validated (the file may have changed).
    let (a, b) = (&obj.0, &geometry.header);
    let same = a.dim == b.dim
        && a.datatype == b.datatype
        && a.bitpix == b.bitpix
        && a.vox_offset.to_bits() == b.vox_offset.to_bits()
        && a.scl_slope.to_bits() == b.scl_slope.to_bits()
        && a.scl_inter.to_bits() == b.scl_inter.to_bits();
    if !same {
        return Err(Error::invalid(path, "the header changed while the file was read"));
    }
    let data = guarded(path, || obj.1.into_ndarray::<f32>().map_err(|e| Error::nifti(path, e)))?;
    let n: usize = geometry.file_shape.iter().product();
    if data.len() != n {
        return Err(Error::invalid(path, format!("holds {} voxels, the header says {n}", data.len())));
    }
    let data = data
        .into_shape_with_order((geometry.file_shape, ndarray::Order::ColumnMajor))
        .map_err(|_| Error::invalid(path, "voxel data could not be shaped as a 3D volume"))?
        .into_dimensionality::<Ix3>()
        .map_err(|e| Error::invalid(path, format!("voxel data is not 3D: {e}")))?;
    check_finite(path, &data, &geometry)?;
    Ok((data, geometry))
}

/// Refuses NaN and infinite voxels, naming the first: every stage would otherwise treat them
/// differently (statistics drop them, resampling spreads them, prediction argmaxes them).
fn check_finite(path: &Path, data: &Array3<f32>, geometry: &Geometry) -> Result<()> {
    // The array is in the file's order (i fastest): its transpose iterates it as stored.
    let values = data.t();
    let Some(first) = values.iter().position(|v| !v.is_finite()) else { return Ok(()) };
    let nan = values.iter().filter(|v| v.is_nan()).count();
    let inf = values.iter().filter(|v| v.is_infinite()).count();
    let [ni, nj, _] = geometry.file_shape;
    let ijk = [first % ni, first / ni % nj, first / (ni * nj)];
    Err(Error::invalid(
        path,
        format!(
            "{nan} NaN and {inf} infinite voxel(s), the first at voxel (i, j, k) = ({}, {}, {}) of the file: {}",
            ijk[0], ijk[1], ijk[2], data[ijk]
        ),
    ))
}

/// Reorders a file-layout array (i, j, k) into the canonical `[z][y][x]` standard layout.
pub fn to_canonical<T: Clone>(data: ArrayView3<'_, T>, o: &Orientation) -> Array3<T> {
    let mut v = data.permuted_axes(o.file_axis);
    for c in 0..3 {
        if o.flip[c] {
            v.invert_axis(Axis(c));
        }
    }
    v.as_standard_layout().into_owned()
}

/// The file-layout view (i, j, k) of a canonical array: no copy.
pub fn to_file_layout<'a, T>(data: ArrayView3<'a, T>, o: &Orientation) -> ArrayView3<'a, T> {
    let mut v = data;
    for c in 0..3 {
        if o.flip[c] {
            v.invert_axis(Axis(c));
        }
    }
    let mut inverse = [0usize; 3];
    for c in 0..3 {
        inverse[o.file_axis[c]] = c;
    }
    v.permuted_axes(inverse)
}

/// Reads an image as f32 (with `scl_slope`/`scl_inter` applied) in canonical order.
pub fn read_image(path: &Path) -> Result<Volume<f32>> {
    let (file_data, geometry) = read_file_order_f32(path)?;
    let data = to_canonical(file_data.view(), &geometry.orientation);
    Ok(Volume { data, geometry })
}

/// Reads a label map: every voxel must be a whole number in 0..=255.
pub fn read_labels(path: &Path) -> Result<Volume<u8>> {
    let (labels, geometry) = read_labels_file_order(path)?;
    let data = to_canonical(labels.view(), &geometry.orientation);
    Ok(Volume { data, geometry })
}

/// A label map in the file's own axis order (i, j, k), as nibabel's `get_fdata()` gives it:
/// what evaluation scripts index.
pub fn read_labels_file_order(path: &Path) -> Result<(Array3<u8>, Geometry)> {
    let (file_data, geometry) = read_file_order_f32(path)?;
    let mut bad: Option<f32> = None;
    let labels = file_data.mapv(|v| {
        // A saturating cast that round-trips is a whole number in 0..=255 (and no libm call).
        if (v as u8) as f32 != v {
            bad.get_or_insert(v);
            0
        } else {
            v as u8
        }
    });
    if let Some(v) = bad {
        return Err(Error::invalid(path, format!("label value {v} is not a whole number in 0..=255")));
    }
    Ok((labels, geometry))
}

/// The header to write data on `reference`'s grid: both sform and qform set to the
/// transform in effect (where the reference had only one), no intensity scaling.
pub fn export_header(reference: &Geometry) -> NiftiHeader {
    let mut h = reference.header.clone();
    let a = reference.file_affine;
    match reference.source {
        AffineSource::Sform if h.qform_code <= 0 => {
            let code = h.sform_code;
            set_qform(&mut h, &a, code)
        }
        AffineSource::Qform => {
            let code = h.qform_code;
            for c in 0..4 {
                h.srow_x[c] = a[0][c] as f32;
                h.srow_y[c] = a[1][c] as f32;
                h.srow_z[c] = a[2][c] as f32;
            }
            h.sform_code = code;
        }
        // Pixdim-only: leave it so, or viewers would place image and labels apart.
        _ => {}
    }
    h.scl_slope = 1.0;
    h.scl_inter = 0.0;
    h.cal_min = 0.0;
    h.cal_max = 0.0;
    h.intent_code = 0;
    h.dim[0] = 3;
    h.dim[4] = 1;
    h
}

fn temporary_sibling(path: &Path) -> PathBuf {
    // Keep the final extension: the nifti writer compresses by the ".gz" ending.
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".tmp-{}-{name}", std::process::id()))
}

/// Writes a canonical array on `geometry`'s grid, atomically (temporary file,
/// fsync, rename): a crash never leaves a half-written file under the final name.
pub fn write_volume<T>(path: &Path, data: ArrayView3<'_, T>, geometry: &Geometry) -> Result<()>
where
    T: DataElement + bytemuck::Pod,
{
    write_volume_with(path, data, geometry, WriterOptionsFlavour::Default)
}

/// How to write: gzip level, and whether to fsync before the rename.
#[derive(Clone, Copy, Debug)]
pub enum WriterOptionsFlavour {
    /// gzip level 1 (the nifti crate's default), fsync'ed.
    Default,
    /// gzip level `n` (0-9), fsync'ed.
    Level(u32),
    /// gzip level `n`, no fsync: still atomic against a killed process (rename), but
    /// not against power loss. For regenerable data such as synthetic phantoms.
    Scratch(u32),
}

pub fn write_volume_with<T>(
    path: &Path,
    data: ArrayView3<'_, T>,
    geometry: &Geometry,
    flavour: WriterOptionsFlavour,
) -> Result<()>
where
    T: DataElement + bytemuck::Pod,
{
    let expected = geometry.shape();
    if data.shape() != expected {
        return Err(Error::invalid(
            path,
            format!("cannot write a {:?} array on a grid of shape {:?} (z, y, x)", data.shape(), expected),
        ));
    }
    let header = export_header(geometry);
    // The nifti writer wants file-order data it can slice contiguously (it panics on
    // reversed strides), so lay the voxels out in NIfTI's own order first.
    let file_view = to_file_layout(data, &geometry.orientation);
    let fortran: Vec<T> = file_view.t().iter().copied().collect();
    let file_data = ndarray::Array3::from_shape_vec(ndarray::ShapeBuilder::f(file_view.raw_dim()), fortran)
        .expect("element count matches the shape");
    let tmp = temporary_sibling(path);
    let mut options = WriterOptions::new(&tmp).reference_header(&header);
    let gz = path.to_string_lossy().ends_with(".gz");
    if let (true, WriterOptionsFlavour::Level(level) | WriterOptionsFlavour::Scratch(level)) = (gz, flavour) {
        options = options.compression_level(flate2::Compression::new(level.min(9)));
    }
    // Errors name the file asked for, as writes (a full disk is no unreadable input).
    let result = options.write_nifti(&file_data).map_err(|e| Error::nifti_write(path, e)).and_then(|_| {
        if !matches!(flavour, WriterOptionsFlavour::Scratch(_)) {
            let f = std::fs::File::open(&tmp).map_err(|e| Error::write(path, e))?;
            f.sync_all().map_err(|e| Error::write(path, e))?;
        }
        std::fs::rename(&tmp, path).map_err(|e| Error::write(path, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes a label map (uint8) on the grid of a reference image.
pub fn write_labels_like(path: &Path, labels: ArrayView3<'_, u8>, reference: &Geometry) -> Result<()> {
    write_volume(path, labels, reference)
}

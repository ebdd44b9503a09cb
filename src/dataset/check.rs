//! `cps3d dataset check`: every problem of a raw dataset, file by file.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::{Case, RawDataset};
use crate::error::{Error, Result};
use crate::io::{self, geometry, Geometry};

/// Geometry tolerances between an image and its label map (nnU-Net checks the same
/// three things with `allclose`).
const SPACING_REL_TOL: f64 = 1e-4;
const DIRECTION_ABS_TOL: f64 = 1e-4;
const ORIGIN_ABS_TOL_MM: f64 = 1e-3;

/// One readable file and what it holds.
#[derive(Debug, Clone)]
pub struct FileSummary {
    pub path: PathBuf,
    pub shape_zyx: [usize; 3],
    pub spacing_zyx: [f64; 3],
    pub datatype: String,
    pub axis_codes: String,
}

#[derive(Debug, Default)]
pub struct CheckReport {
    pub root: PathBuf,
    pub labeled: usize,
    pub unlabeled: usize,
    pub files: Vec<FileSummary>,
    pub problems: Vec<Error>,
    pub warnings: Vec<String>,
}

impl CheckReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// Files with at least one problem, sorted.
    pub fn bad_files(&self) -> BTreeSet<PathBuf> {
        self.problems.iter().map(|e| e.path().to_path_buf()).collect()
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "dataset {}: {} labeled and {} unlabeled cases, {} files read",
            self.root.display(),
            self.labeled,
            self.unlabeled,
            self.files.len()
        );
        for f in &self.files {
            let rel = f.path.strip_prefix(&self.root).unwrap_or(&f.path);
            let _ = writeln!(
                s,
                "  {:<48} {:>4}x{:>4}x{:>4} (z,y,x)  {:.3}x{:.3}x{:.3} mm  {:<8} {}",
                rel.display(),
                f.shape_zyx[0],
                f.shape_zyx[1],
                f.shape_zyx[2],
                f.spacing_zyx[0],
                f.spacing_zyx[1],
                f.spacing_zyx[2],
                f.datatype,
                f.axis_codes
            );
        }
        for w in &self.warnings {
            let _ = writeln!(s, "warning: {w}");
        }
        if self.problems.is_empty() {
            let _ = writeln!(s, "OK: no problems found");
        } else {
            let _ = writeln!(s, "{} problem(s) in {} file(s):", self.problems.len(), self.bad_files().len());
            for p in &self.problems {
                let _ = writeln!(s, "  {p}");
            }
        }
        s
    }
}

fn summary(path: &Path, g: &Geometry) -> FileSummary {
    FileSummary {
        path: path.to_path_buf(),
        shape_zyx: g.shape(),
        spacing_zyx: g.spacing(),
        datatype: g.datatype().map(|t| format!("{t:?}").to_lowercase()).unwrap_or_else(|| "?".into()),
        axis_codes: g.axis_codes(),
    }
}

/// Compares a label map's grid with its image's; `None` when they agree.
pub fn geometry_mismatch(image: &Geometry, label: &Geometry) -> Option<String> {
    if image.file_shape != label.file_shape {
        return Some(format!(
            "shape {:?} differs from its image's {:?} (file axis order)",
            label.file_shape, image.file_shape
        ));
    }
    let (a, b) = (image.file_affine, label.file_affine);
    let sa = geometry::column_norms(&a);
    let sb = geometry::column_norms(&b);
    for i in 0..3 {
        if (sa[i] - sb[i]).abs() > SPACING_REL_TOL * sa[i].max(sb[i]) {
            return Some(format!("spacing {sb:.5?} mm differs from its image's {sa:.5?} mm"));
        }
    }
    for c in 0..3 {
        for r in 0..3 {
            if (a[r][c] / sa[c] - b[r][c] / sb[c]).abs() > DIRECTION_ABS_TOL {
                return Some(format!(
                    "orientation differs from its image's ({} vs {}; direction of axis {c} not within {DIRECTION_ABS_TOL})",
                    label.axis_codes(),
                    image.axis_codes()
                ));
            }
        }
    }
    for r in 0..3 {
        if (a[r][3] - b[r][3]).abs() > ORIGIN_ABS_TOL_MM {
            return Some(format!(
                "origin ({:.3}, {:.3}, {:.3}) mm differs from its image's ({:.3}, {:.3}, {:.3}) mm",
                b[0][3], b[1][3], b[2][3], a[0][3], a[1][3], a[2][3]
            ));
        }
    }
    None
}

/// Everything found about one case.
struct CaseResult {
    files: Vec<FileSummary>,
    problems: Vec<Error>,
}

fn check_image(path: &Path, problems: &mut Vec<Error>, files: &mut Vec<FileSummary>) -> Option<Geometry> {
    // The reader refuses NaN and infinite voxels itself, naming the first.
    match io::read_image(path) {
        Ok(v) => {
            files.push(summary(path, &v.geometry));
            Some(v.geometry)
        }
        Err(e) => {
            problems.push(e);
            None
        }
    }
}

fn check_case(case: &Case, allowed: &BTreeSet<u8>) -> CaseResult {
    let mut problems = Vec::new();
    let mut files = Vec::new();
    let mut first: Option<Geometry> = None;
    for img in &case.images {
        if let Some(g) = check_image(img, &mut problems, &mut files) {
            match &first {
                None => first = Some(g),
                Some(f) => {
                    if let Some(m) = geometry_mismatch(f, &g) {
                        problems
                            .push(Error::invalid(img, format!("channel {}", m.replace("its image's", "channel 0's"))));
                    }
                }
            }
        }
    }
    if let Some(label_path) = &case.label {
        match io::read_labels(label_path) {
            Ok(v) => {
                files.push(summary(label_path, &v.geometry));
                if let Some(img) = &first {
                    if let Some(m) = geometry_mismatch(img, &v.geometry) {
                        problems.push(Error::invalid(label_path, m));
                    }
                }
                let mut present = [false; 256];
                for &l in v.data.iter() {
                    present[l as usize] = true;
                }
                let unknown: Vec<u8> = (0..=255u8).filter(|&l| present[l as usize] && !allowed.contains(&l)).collect();
                if !unknown.is_empty() {
                    let listed: Vec<String> = unknown.iter().map(u8::to_string).collect();
                    problems.push(Error::invalid(
                        label_path,
                        format!(
                            "label value(s) {} not in dataset.json's labels ({})",
                            listed.join(", "),
                            allowed.iter().map(u8::to_string).collect::<Vec<_>>().join(",")
                        ),
                    ));
                }
            }
            Err(e) => problems.push(e),
        }
    }
    CaseResult { files, problems }
}

/// Checks a dataset: its json, its layout and every file, with `workers` threads
/// (one case in memory per worker). `on_case` is called after each case (progress).
pub fn check_dataset(root: &Path, workers: usize, on_case: impl FnMut()) -> Result<CheckReport> {
    let mut ds = match RawDataset::open(root) {
        Ok(ds) => ds,
        Err(e) => {
            // An unreadable dataset.json is itself the report.
            return Ok(CheckReport { root: root.to_path_buf(), problems: vec![e], ..Default::default() });
        }
    };
    let allowed: BTreeSet<u8> = ds.json.labels.keys().copied().collect();
    let mut report = CheckReport {
        root: root.to_path_buf(),
        labeled: ds.labeled.len(),
        unlabeled: ds.unlabeled.len(),
        problems: std::mem::take(&mut ds.layout_problems),
        ..Default::default()
    };
    for p in &ds.stray_files {
        report.warnings.push(format!("{}: not named {{CASE}}_{{XXXX}}{}, ignored", p.display(), ds.json.file_ending));
    }
    if ds.labeled.is_empty() {
        report
            .problems
            .push(Error::invalid(root.join(super::IMAGES_TR), "no complete training case (image + label) found"));
    }
    let cases: Vec<Case> = ds.cases().cloned().collect();
    let mut on_case = on_case;
    let mut results = Vec::with_capacity(cases.len());
    cps3d_actors::pool::for_each_bounded(
        cases.into_iter().enumerate(),
        workers,
        |(i, case)| {
            let r = super::catch_case_panic(&case, || Ok(check_case(&case, &allowed)));
            (i, r.unwrap_or_else(|e| CaseResult { files: Vec::new(), problems: vec![e] }))
        },
        |r| {
            on_case();
            results.push(r);
        },
    );
    // Report in case order whatever the completion order.
    let mut ordered: Vec<(usize, CaseResult)> = Vec::with_capacity(results.len());
    for r in results {
        match r {
            Ok(v) => ordered.push(v),
            Err(panic) => report.problems.push(Error::invalid(root, format!("a check worker panicked: {panic}"))),
        }
    }
    ordered.sort_by_key(|(i, _)| *i);
    for (_, r) in ordered {
        report.files.extend(r.files);
        report.problems.extend(r.problems);
    }
    Ok(report)
}

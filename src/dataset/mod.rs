//! Raw datasets in nnU-Net's layout, plus `imagesUnlabeled/` for unlabeled scans.
//!
//! ```text
//! DATASET/dataset.json
//! DATASET/imagesTr/{CASE}_{CHANNEL:04}{file_ending}
//! DATASET/labelsTr/{CASE}{file_ending}
//! DATASET/imagesUnlabeled/{CASE}_{CHANNEL:04}{file_ending}
//! ```

pub mod check;
pub mod labels;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// What `dataset.json` says, in either nnU-Net v2 (`channel_names`, labels as
/// name → id) or v1 (`modality`, labels as id → name) form.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DatasetJson {
    pub name: Option<String>,
    /// Channel index → name (e.g. 0 → "CT").
    pub channels: BTreeMap<usize, String>,
    /// Label id → name, background (0) included.
    pub labels: BTreeMap<u8, String>,
    pub num_training: Option<usize>,
    pub file_ending: String,
}

impl DatasetJson {
    pub fn read(path: &Path) -> Result<DatasetJson> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| Error::json(path, e))?;
        Self::from_value(path, &value)
    }

    pub fn from_value(path: &Path, value: &Value) -> Result<DatasetJson> {
        let obj = value.as_object().ok_or_else(|| Error::invalid(path, "dataset.json must hold a JSON object"))?;
        let channels_value = obj
            .get("channel_names")
            .or_else(|| obj.get("modality"))
            .ok_or_else(|| Error::invalid(path, "missing field \"channel_names\" (or nnU-Net v1's \"modality\")"))?;
        let channels_obj = channels_value
            .as_object()
            .ok_or_else(|| Error::invalid(path, "\"channel_names\" must be an object like {\"0\": \"CT\"}"))?;
        let mut channels = BTreeMap::new();
        for (k, v) in channels_obj {
            let idx: usize =
                k.parse().map_err(|_| Error::invalid(path, format!("channel key \"{k}\" is not a channel number")))?;
            let name = v.as_str().ok_or_else(|| Error::invalid(path, format!("channel {k} must name a modality")))?;
            channels.insert(idx, name.to_string());
        }
        if channels.is_empty() {
            return Err(Error::invalid(path, "\"channel_names\" is empty"));
        }
        for (expected, idx) in channels.keys().enumerate() {
            if *idx != expected {
                return Err(Error::invalid(
                    path,
                    format!("channels must be numbered 0..{}, found {idx}", channels.len()),
                ));
            }
        }

        let labels_obj = obj
            .get("labels")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::invalid(path, "missing field \"labels\" (an object of label names and ids)"))?;
        let mut labels = BTreeMap::new();
        for (k, v) in labels_obj {
            // v2: "liver": 1; v1: "1": "liver".
            let (id, name) = match (v.as_u64(), v.as_str(), k.parse::<u64>()) {
                (Some(id), _, _) => (id, k.clone()),
                (None, Some(name), Ok(id)) => (id, name.to_string()),
                _ => {
                    return Err(Error::invalid(
                        path,
                        format!(
                            "label \"{k}\": expected an integer id (region-based labels are not supported), got {v}"
                        ),
                    ))
                }
            };
            if id > 255 {
                return Err(Error::invalid(path, format!("label \"{name}\" has id {id}; ids must be 0..=255")));
            }
            if let Some(prev) = labels.insert(id as u8, name.clone()) {
                return Err(Error::invalid(path, format!("labels \"{prev}\" and \"{name}\" share id {id}")));
            }
        }
        if !labels.contains_key(&0) {
            return Err(Error::invalid(path, "\"labels\" must define background as 0"));
        }
        let num_training = match obj.get("numTraining") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .ok_or_else(|| Error::invalid(path, format!("\"numTraining\" must be a whole number, got {v}")))?
                    as usize,
            ),
        };
        let file_ending = match obj.get("file_ending") {
            None => ".nii.gz".to_string(),
            Some(v) => v.as_str().ok_or_else(|| Error::invalid(path, "\"file_ending\" must be a string"))?.to_string(),
        };
        if file_ending != ".nii.gz" && file_ending != ".nii" {
            return Err(Error::invalid(
                path,
                format!("file_ending \"{file_ending}\" is not supported (use .nii.gz or .nii)"),
            ));
        }
        Ok(DatasetJson {
            name: obj.get("name").and_then(Value::as_str).map(str::to_string),
            channels,
            labels,
            num_training,
            file_ending,
        })
    }

    /// The largest label id: the number of classes is this plus one.
    pub fn max_label(&self) -> u8 {
        *self.labels.keys().next_back().unwrap_or(&0)
    }
}

/// One scan of the dataset: its channel files and, for training cases, its label map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    pub id: String,
    pub images: Vec<PathBuf>,
    pub label: Option<PathBuf>,
}

impl Case {
    pub fn is_labeled(&self) -> bool {
        self.label.is_some()
    }

    /// Reads every channel and the label map (canonical order), checking that they
    /// share one grid. One case in memory: what each pipeline worker holds.
    pub fn load(&self) -> Result<LoadedCase> {
        let mut channels = Vec::with_capacity(self.images.len());
        let mut geometry: Option<crate::io::Geometry> = None;
        for path in &self.images {
            let v = crate::io::read_image(path)?;
            match &geometry {
                Some(g0) => {
                    if let Some(m) = check::geometry_mismatch(g0, &v.geometry) {
                        return Err(Error::invalid(
                            path,
                            format!("channel {}", m.replace("its image's", "channel 0's")),
                        ));
                    }
                }
                None => geometry = Some(v.geometry.clone()),
            }
            channels.push(v.data);
        }
        let geometry = geometry.ok_or_else(|| Error::invalid(&self.id, "case has no image"))?;
        let labels = match &self.label {
            Some(p) => {
                let l = crate::io::read_labels(p)?;
                if let Some(m) = check::geometry_mismatch(&geometry, &l.geometry) {
                    return Err(Error::invalid(p, m));
                }
                Some(l.data)
            }
            None => None,
        };
        Ok(LoadedCase { channels, geometry, labels })
    }
}

/// Runs `f` on a case, turning a panic into an error that names the case and its files:
/// a pool worker's panic would otherwise be reported without them.
pub fn catch_case_panic<T>(case: &Case, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = cps3d_actors::pool::panic_message(panic.as_ref());
        let files: Vec<String> = case.images.iter().chain(&case.label).map(|p| p.display().to_string()).collect();
        let first = case.images.first().cloned().unwrap_or_else(|| PathBuf::from(&case.id));
        Err(Error::invalid(first, format!("crashed on case \"{}\" ({}): {what}", case.id, files.join(", "))))
    })
}

/// A case read into memory.
pub struct LoadedCase {
    /// One canonical `[z][y][x]` volume per channel.
    pub channels: Vec<ndarray::Array3<f32>>,
    pub geometry: crate::io::Geometry,
    pub labels: Option<ndarray::Array3<u8>>,
}

/// A raw dataset folder, listed but not yet read.
#[derive(Debug)]
pub struct RawDataset {
    pub root: PathBuf,
    pub json: DatasetJson,
    pub labeled: Vec<Case>,
    pub unlabeled: Vec<Case>,
    /// Problems found while listing (a missing label, a missing channel file, ...).
    pub layout_problems: Vec<Error>,
    /// Files in the image folders that do not follow the naming scheme.
    pub stray_files: Vec<PathBuf>,
}

pub const IMAGES_TR: &str = "imagesTr";
pub const LABELS_TR: &str = "labelsTr";
pub const IMAGES_UNLABELED: &str = "imagesUnlabeled";

impl RawDataset {
    /// Lists a dataset folder. A missing or invalid `dataset.json` is an error; problems
    /// of single cases are collected in `layout_problems` so that all can be reported.
    pub fn open(root: &Path) -> Result<RawDataset> {
        if !root.is_dir() {
            return Err(Error::invalid(root, "not a directory"));
        }
        let json_path = root.join("dataset.json");
        match std::fs::metadata(&json_path) {
            Ok(m) if m.is_file() => {}
            // Not read: a FIFO would block.
            Ok(m) => {
                let kind = crate::io::file_kind(&m.file_type());
                return Err(Error::invalid(&json_path, format!("not a regular file ({kind})")));
            }
            Err(_) => return Err(Error::invalid(&json_path, "missing: a dataset needs dataset.json")),
        }
        let json = DatasetJson::read(&json_path)?;
        let mut layout_problems = Vec::new();
        let mut stray_files = Vec::new();
        for dir in [IMAGES_TR, LABELS_TR, IMAGES_UNLABELED] {
            layout_problems.extend(not_a_folder(&root.join(dir)));
        }

        let images_tr = root.join(IMAGES_TR);
        let labels_tr = root.join(LABELS_TR);
        let tr_images = list_channel_files(&images_tr, &json, &mut stray_files, &mut layout_problems)?;
        let tr_labels = list_files(&labels_tr, &json.file_ending, &mut layout_problems)?;

        let mut labeled = Vec::new();
        for (id, channels) in &tr_images {
            let label = labels_tr.join(format!("{id}{}", json.file_ending));
            let images = complete_channels(&images_tr, id, channels, &json, &mut layout_problems);
            if !tr_labels.contains(id) {
                layout_problems
                    .push(Error::invalid(&label, format!("missing: training case \"{id}\" has an image but no label")));
                continue;
            }
            if let Some(images) = images {
                labeled.push(Case { id: id.clone(), images, label: Some(label) });
            }
        }
        for id in &tr_labels {
            if !tr_images.contains_key(id) {
                let expected = images_tr.join(format!("{id}_0000{}", json.file_ending));
                layout_problems.push(Error::invalid(
                    labels_tr.join(format!("{id}{}", json.file_ending)),
                    format!("label without image: {} is missing", expected.display()),
                ));
            }
        }
        if let Some(n) = json.num_training {
            if n != tr_images.len() {
                layout_problems.push(Error::invalid(
                    &json_path,
                    format!("numTraining is {n} but {} has {} training cases", IMAGES_TR, tr_images.len()),
                ));
            }
        }

        let images_u = root.join(IMAGES_UNLABELED);
        let mut unlabeled = Vec::new();
        if images_u.is_dir() {
            for (id, channels) in list_channel_files(&images_u, &json, &mut stray_files, &mut layout_problems)? {
                if let Some(images) = complete_channels(&images_u, &id, &channels, &json, &mut layout_problems) {
                    unlabeled.push(Case { id, images, label: None });
                }
            }
        }
        Ok(RawDataset { root: root.to_path_buf(), json, labeled, unlabeled, layout_problems, stray_files })
    }

    pub fn cases(&self) -> impl Iterator<Item = &Case> {
        self.labeled.iter().chain(self.unlabeled.iter())
    }

    /// The cases of one part of a split job: every `count`-th of [`Self::cases`], from
    /// the `index`-th (round robin: every part gets labeled and unlabeled cases alike).
    pub fn share(&self, part: crate::util::Part) -> Vec<Case> {
        self.cases().enumerate().filter(|(i, _)| part.owns(*i)).map(|(_, c)| c.clone()).collect()
    }
}

/// A problem when `dir` exists but is no folder (a file, a dangling link, ...): it would
/// otherwise read as an empty folder, "0 cases", and pass.
fn not_a_folder(dir: &Path) -> Option<Error> {
    let link = dir.symlink_metadata().ok()?;
    let what = match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => return None,
        Ok(m) if link.file_type().is_symlink() => {
            format!("a symbolic link to {}", crate::io::file_kind(&m.file_type()).trim_start_matches("a "))
        }
        Ok(m) => crate::io::file_kind(&m.file_type()).to_string(),
        Err(_) => {
            let target = std::fs::read_link(dir).map(|t| t.display().to_string()).unwrap_or_default();
            format!("a dangling symbolic link (to {target})")
        }
    };
    Some(Error::invalid(dir, format!("{what}, not a folder")))
}

/// The name of a listed file, or `None` after recording a problem when it is not UTF-8 and
/// looks like a case file (case ids are text: such a file could only be "not found" later).
fn utf8_name(entry: &std::fs::DirEntry, ending: &str, problems: &mut Vec<Error>) -> Option<String> {
    let name = entry.file_name();
    if let Some(n) = name.to_str() {
        return Some(n.to_string());
    }
    let lossy = name.to_string_lossy();
    if lossy.ends_with(ending) && !lossy.starts_with('.') {
        problems.push(Error::invalid(
            entry.path(),
            "file name is not valid UTF-8 (shown with \u{FFFD} for the bad bytes); rename it",
        ));
        return None;
    }
    Some(lossy.into_owned())
}

fn list_files(dir: &Path, ending: &str, problems: &mut Vec<Error>) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    if !dir.is_dir() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let Some(name) = utf8_name(&entry, ending, problems) else { continue };
        if let Some(stem) = name.strip_suffix(ending) {
            if !name.starts_with('.') {
                out.insert(stem.to_string());
            }
        }
    }
    Ok(out)
}

/// Case id → channel numbers present, from files named `{CASE}_{XXXX}{ending}`.
/// nnU-Net's image file stem `CASE_XXXX`: the case id and the channel number.
pub fn split_channel(stem: &str) -> Option<(&str, usize)> {
    let (id, ch) = stem.rsplit_once('_')?;
    if ch.len() == 4 && ch.bytes().all(|b| b.is_ascii_digit()) && !id.is_empty() {
        Some((id, ch.parse().ok()?))
    } else {
        None
    }
}

fn list_channel_files(
    dir: &Path,
    json: &DatasetJson,
    stray: &mut Vec<PathBuf>,
    problems: &mut Vec<Error>,
) -> Result<BTreeMap<String, BTreeSet<usize>>> {
    let mut out: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
    if !dir.is_dir() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let Some(name) = utf8_name(&entry, &json.file_ending, problems) else { continue };
        if name.starts_with('.') {
            continue; // temporary files of an interrupted writer, editor files
        }
        let parsed =
            name.strip_suffix(json.file_ending.as_str()).and_then(split_channel).map(|(id, ch)| (id.to_string(), ch));
        match parsed {
            Some((id, ch)) => {
                out.entry(id).or_default().insert(ch);
            }
            None => stray.push(entry.path()),
        }
    }
    Ok(out)
}

fn complete_channels(
    dir: &Path,
    id: &str,
    present: &BTreeSet<usize>,
    json: &DatasetJson,
    problems: &mut Vec<Error>,
) -> Option<Vec<PathBuf>> {
    let mut images = Vec::with_capacity(json.channels.len());
    let mut complete = true;
    for &ch in json.channels.keys() {
        let p = dir.join(format!("{id}_{ch:04}{}", json.file_ending));
        if !present.contains(&ch) {
            problems.push(Error::invalid(
                &p,
                format!("missing: case \"{id}\" lacks channel {ch} ({})", json.channels[&ch]),
            ));
            complete = false;
        }
        images.push(p);
    }
    for ch in present {
        if !json.channels.contains_key(ch) {
            problems.push(Error::invalid(
                dir.join(format!("{id}_{ch:04}{}", json.file_ending)),
                format!("channel {ch} is not declared in dataset.json's channel_names"),
            ));
        }
    }
    complete.then_some(images)
}

//! PyTorch checkpoints in torch.save's zip format, readable by `torch.load` (any `weights_only`,
//! `mmap`, `map_location`).
//!
//! The archive holds, under one top folder (`archive/`, as torch.save names it for a buffer):
//! - `data.pkl`: the pickled object; tensors are `_rebuild_tensor_v2` calls whose storage is a
//!   persistent id naming `data/{key}` (see `pickle.rs`);
//! - `data/{key}`: each storage's raw little-endian bytes, stored uncompressed with its data
//!   64-byte aligned (torch.load with `mmap=True` slices the mapped file at these offsets);
//! - `byteorder` (`little`), `version` (`3`, torch's file format version) and
//!   `.storage_alignment` (`64`).
//!
//! We leave out `.format_version`: when it is present, torch.load may compute storage offsets
//! instead of reading them (meta/fake-tensor loads, `calculate_storage_offsets`), assuming
//! miniz's exact header layout ("FB" padding fields, data descriptors), which the zip crate does
//! not write. Without it torch reads every offset from the local headers. `.data/serialization_id`
//! is only logged by torch and would make the bytes differ from run to run.

use std::collections::HashMap;
use std::io::{BufWriter, Seek, Write};
use std::path::Path;
use std::sync::Arc;

use zip::result::ZipResult;
use zip::{CompressionMethod, ZipWriter};

use super::pickle::{self, TensorRef, Value};
use super::{write_file_atomically, zip_error, zip_options};
use crate::error::{Error, Result};

/// A named float32 tensor of a state dict. Names that alias one parameter (as nnU-Net's
/// PlainConvUNet lists `...conv.weight` again as `...all_modules.0.weight`) share one `data` Arc;
/// they then share one storage in the checkpoint, as with torch.save.
#[derive(Clone, Debug)]
pub struct StateTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Arc<Vec<f32>>,
}

/// The storages of one checkpoint, keyed `0, 1, ...` in the order they were added.
#[derive(Default, Debug)]
pub struct Storages {
    data: Vec<Arc<Vec<f32>>>,
    /// Key by the address of an Arc's data (as an integer, so that `Storages` stays `Send`).
    keys: HashMap<usize, usize>,
}

impl Storages {
    pub fn new() -> Storages {
        Storages::default()
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The storage with key `key`.
    pub fn get(&self, key: usize) -> Option<&Arc<Vec<f32>>> {
        self.data.get(key)
    }

    /// The key of `data`'s storage, added on first sight; clones of one Arc get one key.
    pub fn add(&mut self, data: &Arc<Vec<f32>>) -> usize {
        // The pointer identifies the Arc's allocation, which `self.data` keeps alive, so it
        // cannot be reused for other data while we hold it.
        *self.keys.entry(Arc::as_ptr(data) as usize).or_insert_with(|| {
            self.data.push(Arc::clone(data));
            self.data.len() - 1
        })
    }

    /// A contiguous tensor of shape `shape` over all of `data` (checked when written).
    pub fn tensor(&mut self, data: &Arc<Vec<f32>>, shape: &[usize]) -> Value {
        self.view(data, 0, shape, &TensorRef::contiguous_stride(shape))
    }

    /// A strided view into `data` (offset and strides in elements; checked when written).
    pub fn view(&mut self, data: &Arc<Vec<f32>>, offset: usize, shape: &[usize], stride: &[usize]) -> Value {
        let storage = self.add(data);
        Value::Tensor(TensorRef {
            storage,
            storage_numel: data.len(),
            offset,
            shape: shape.to_vec(),
            stride: stride.to_vec(),
        })
    }

    /// A state dict (`collections.OrderedDict` of name to tensor) in the order given.
    pub fn state_dict(&mut self, tensors: &[StateTensor]) -> Value {
        Value::OrderedDict(tensors.iter().map(|t| (t.name.clone(), self.tensor(&t.data, &t.shape))).collect())
    }
}

/// Writes `root` (typically a dict holding a state dict from [`Storages::state_dict`]) with the
/// storages its tensors refer to as a torch.save-style checkpoint, atomically.
pub fn write_checkpoint(path: &Path, root: &Value, storages: &Storages) -> Result<()> {
    let mut problem = None;
    root.for_each_tensor(&mut |t| {
        if problem.is_some() {
            return;
        }
        problem = match storages.get(t.storage) {
            None => Some(format!("a tensor refers to storage {} of {}", t.storage, storages.len())),
            Some(d) if d.len() != t.storage_numel => Some(format!(
                "a tensor says storage {} has {} elements but it has {}",
                t.storage,
                t.storage_numel,
                d.len()
            )),
            Some(_) => t.check().err(),
        };
    });
    if let Some(problem) = problem {
        return Err(Error::invalid(path, problem));
    }

    let pickled = pickle::to_bytes(root);
    write_file_atomically(path, |file| {
        let mut zip = zip::ZipWriter::new(BufWriter::with_capacity(1 << 20, file));
        write_entries(&mut zip, &pickled, storages).map_err(|e| zip_error(path, e))?;
        let buffered = zip.finish().map_err(|e| zip_error(path, e))?;
        buffered.into_inner().map_err(|e| Error::io(path, e.into_error()))
    })
}

fn write_entries<W: Write + Seek>(zip: &mut ZipWriter<W>, pickled: &[u8], storages: &Storages) -> ZipResult<()> {
    let mut entry = |name: &str, bytes: &[u8]| -> ZipResult<()> {
        let stored = zip_options()
            .compression_method(CompressionMethod::Stored)
            .with_alignment(64)
            .large_file(bytes.len() as u64 >= u32::MAX as u64);
        zip.start_file(format!("archive/{name}"), stored)?;
        Ok(zip.write_all(bytes)?)
    };
    entry("data.pkl", pickled)?;
    entry("byteorder", b"little")?;
    for (key, data) in storages.data.iter().enumerate() {
        if cfg!(target_endian = "little") {
            entry(&format!("data/{key}"), bytemuck::cast_slice(data.as_slice()))?;
        } else {
            let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            entry(&format!("data/{key}"), &bytes)?;
        }
    }
    entry("version", b"3\n")?;
    entry(".storage_alignment", b"64")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_share_a_storage() {
        let w = Arc::new(vec![1.0f32; 6]);
        let b = Arc::new(vec![0.5f32; 2]);
        let tensors = [
            StateTensor { name: "conv.weight".into(), shape: vec![2, 3], data: w.clone() },
            StateTensor { name: "conv.bias".into(), shape: vec![2], data: b.clone() },
            StateTensor { name: "all_modules.0.weight".into(), shape: vec![2, 3], data: w.clone() },
        ];
        let mut storages = Storages::new();
        let Value::OrderedDict(sd) = storages.state_dict(&tensors) else { panic!("not an OrderedDict") };
        assert_eq!(storages.len(), 2);
        let key = |i: usize| match &sd[i].1 {
            Value::Tensor(t) => t.storage,
            _ => panic!("not a tensor"),
        };
        assert_eq!((key(0), key(1), key(2)), (0, 1, 0));
    }

    #[test]
    fn bad_views_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.pth");
        let mut storages = Storages::new();
        let t = storages.tensor(&Arc::new(vec![0.0; 5]), &[2, 3]);
        let e = write_checkpoint(&path, &Value::dict([("t", t)]), &storages).unwrap_err();
        assert_eq!(e.path(), path);
        assert!(e.to_string().contains("reaches past its storage"), "{e}");
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "temporary file left behind");
    }

    #[test]
    fn storages_are_64_byte_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.pth");
        let mut storages = Storages::new();
        let tensors: Vec<Value> = (1..6).map(|n| storages.tensor(&Arc::new(vec![1.0; n]), &[n])).collect();
        write_checkpoint(&path, &Value::List(tensors), &storages).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(&bytes)).unwrap();
        for i in 0..archive.len() {
            let f = archive.by_index(i).unwrap();
            assert!(f.name().starts_with("archive/"), "{}", f.name());
            assert_eq!(f.compression(), CompressionMethod::Stored);
            assert_eq!(f.data_start() % 64, 0, "{} not aligned", f.name());
        }
        let f = archive.by_name("archive/data/4").unwrap();
        let start = f.data_start() as usize;
        assert_eq!(&bytes[start..start + 20], bytemuck::cast_slice::<f32, u8>(&[1.0; 5]));
    }
}

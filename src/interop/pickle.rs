//! A small Python pickle writer (protocol 2, no memo): plain values, `collections.OrderedDict`,
//! and PyTorch tensors whose storages are referenced by persistent id (see `pth.rs`).
//!
//! Protocol 2 because torch.save writes it and every Python 3 reads it; the memo is left out
//! because nothing we write is a cyclic or repeated object (shared tensor storages are shared
//! through persistent ids, which torch.load caches by key).

use std::path::Path;

use crate::error::{Error, Result};

/// A Python value to pickle.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// A `dict`; entries keep their order (Python dicts do too).
    Dict(Vec<(Value, Value)>),
    /// A `collections.OrderedDict` with string keys, as in a PyTorch state dict.
    OrderedDict(Vec<(String, Value)>),
    /// A float32 `torch.Tensor` on the CPU: only meaningful inside a checkpoint (`pth.rs`), whose
    /// unpickler resolves the storage; a plain `pickle.load` rejects it.
    Tensor(TensorRef),
}

/// A tensor as a view of a storage: `archive/data/{storage}` of the checkpoint, `storage_numel`
/// float32 elements long. Offsets and strides count elements, as in PyTorch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorRef {
    pub storage: usize,
    pub storage_numel: usize,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

impl TensorRef {
    /// Row-major strides of `shape`.
    pub fn contiguous_stride(shape: &[usize]) -> Vec<usize> {
        let mut stride = vec![1; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * shape[i + 1].max(1);
        }
        stride
    }

    /// Why the view does not fit its storage, if it does not.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.shape.len() != self.stride.len() {
            return Err(format!("tensor has {} dims but {} strides", self.shape.len(), self.stride.len()));
        }
        if self.shape.contains(&0) {
            return Ok(());
        }
        let last = self
            .shape
            .iter()
            .zip(&self.stride)
            .try_fold(self.offset, |acc, (&n, &s)| (n - 1).checked_mul(s).and_then(|d| acc.checked_add(d)));
        match last {
            Some(last) if last < self.storage_numel => Ok(()),
            _ => Err(format!(
                "tensor view (offset {}, shape {:?}, stride {:?}) reaches past its storage of {} elements",
                self.offset, self.shape, self.stride, self.storage_numel
            )),
        }
    }
}

impl Value {
    pub fn str(s: impl Into<String>) -> Value {
        Value::Str(s.into())
    }

    /// A dict with string keys.
    pub fn dict<K: Into<String>>(entries: impl IntoIterator<Item = (K, Value)>) -> Value {
        Value::Dict(entries.into_iter().map(|(k, v)| (Value::Str(k.into()), v)).collect())
    }

    pub fn int_tuple(items: &[i64]) -> Value {
        Value::Tuple(items.iter().map(|&i| Value::Int(i)).collect())
    }

    pub fn float_tuple(items: &[f64]) -> Value {
        Value::Tuple(items.iter().map(|&x| Value::Float(x)).collect())
    }

    /// Whether a tensor occurs anywhere inside.
    pub fn contains_tensor(&self) -> bool {
        match self {
            Value::Tensor(_) => true,
            Value::List(items) | Value::Tuple(items) => items.iter().any(Value::contains_tensor),
            Value::Dict(entries) => entries.iter().any(|(k, v)| k.contains_tensor() || v.contains_tensor()),
            Value::OrderedDict(entries) => entries.iter().any(|(_, v)| v.contains_tensor()),
            _ => false,
        }
    }

    /// Calls `f` on every tensor inside, in pickle order.
    pub fn for_each_tensor<'a>(&'a self, f: &mut dyn FnMut(&'a TensorRef)) {
        match self {
            Value::Tensor(t) => f(t),
            Value::List(items) | Value::Tuple(items) => items.iter().for_each(|v| v.for_each_tensor(f)),
            Value::Dict(entries) => entries.iter().for_each(|(k, v)| {
                k.for_each_tensor(f);
                v.for_each_tensor(f);
            }),
            Value::OrderedDict(entries) => entries.iter().for_each(|(_, v)| v.for_each_tensor(f)),
            _ => {}
        }
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Bool(b)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Value {
        Value::Int(i)
    }
}

impl From<f64> for Value {
    fn from(x: f64) -> Value {
        Value::Float(x)
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Str(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Str(s)
    }
}

/// JSON as `json.load` would give it: integers as `int`, other numbers as `float`, arrays as
/// lists, objects as dicts (in serde_json's key order, which nnU-Net does not care about).
impl From<&serde_json::Value> for Value {
    fn from(j: &serde_json::Value) -> Value {
        use serde_json::Value as J;
        match j {
            J::Null => Value::None,
            J::Bool(b) => Value::Bool(*b),
            // Integers beyond i64 (u64 above i64::MAX) become floats: plans never hold them.
            J::Number(n) => n.as_i64().map(Value::Int).unwrap_or_else(|| Value::Float(n.as_f64().unwrap_or(f64::NAN))),
            J::String(s) => Value::Str(s.clone()),
            J::Array(items) => Value::List(items.iter().map(Value::from).collect()),
            J::Object(map) => Value::Dict(map.iter().map(|(k, v)| (Value::Str(k.clone()), Value::from(v))).collect()),
        }
    }
}

// Opcodes (Lib/pickle.py).
const PROTO: u8 = 0x80;
const STOP: u8 = b'.';
const NONE: u8 = b'N';
const NEWTRUE: u8 = 0x88;
const NEWFALSE: u8 = 0x89;
const BININT: u8 = b'J';
const BININT1: u8 = b'K';
const BININT2: u8 = b'M';
const LONG1: u8 = 0x8a;
const BINFLOAT: u8 = b'G';
const BINUNICODE: u8 = b'X';
const MARK: u8 = b'(';
const EMPTY_LIST: u8 = b']';
const APPENDS: u8 = b'e';
const EMPTY_TUPLE: u8 = b')';
const TUPLE: u8 = b't';
const TUPLE1: u8 = 0x85;
const TUPLE2: u8 = 0x86;
const TUPLE3: u8 = 0x87;
const EMPTY_DICT: u8 = b'}';
const SETITEMS: u8 = b'u';
const GLOBAL: u8 = b'c';
const REDUCE: u8 = b'R';
const BINPERSID: u8 = b'Q';

/// The pickle of `v` (protocol 2).
pub fn to_bytes(v: &Value) -> Vec<u8> {
    let mut out = vec![PROTO, 2];
    put(&mut out, v);
    out.push(STOP);
    out
}

/// Writes `v` as a plain pickle file (like nnU-Net's `save_pickle`), atomically.
pub fn write_pickle(path: &Path, v: &Value) -> Result<()> {
    if v.contains_tensor() {
        return Err(Error::invalid(path, "a plain pickle cannot hold tensors (write a checkpoint instead)"));
    }
    let bytes = to_bytes(v);
    super::write_file_atomically(path, |mut file| {
        use std::io::Write;
        file.write_all(&bytes).map_err(|e| Error::io(path, e))?;
        Ok(file)
    })
}

fn put(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::None => out.push(NONE),
        Value::Bool(b) => out.push(if *b { NEWTRUE } else { NEWFALSE }),
        Value::Int(i) => put_int(out, *i),
        Value::Float(x) => {
            out.push(BINFLOAT);
            out.extend_from_slice(&x.to_be_bytes());
        }
        Value::Str(s) => put_str(out, s),
        Value::List(items) => {
            out.push(EMPTY_LIST);
            if !items.is_empty() {
                out.push(MARK);
                items.iter().for_each(|item| put(out, item));
                out.push(APPENDS);
            }
        }
        Value::Tuple(items) => put_tuple(out, items.iter(), items.len()),
        Value::Dict(entries) => {
            out.push(EMPTY_DICT);
            put_items(out, entries.iter().map(|(k, v)| (Key::Value(k), v)));
        }
        Value::OrderedDict(entries) => {
            put_ordered_dict_new(out);
            put_items(out, entries.iter().map(|(k, v)| (Key::Str(k), v)));
        }
        Value::Tensor(t) => put_tensor(out, t),
    }
}

enum Key<'a> {
    Value(&'a Value),
    Str(&'a str),
}

fn put_items<'a>(out: &mut Vec<u8>, entries: impl ExactSizeIterator<Item = (Key<'a>, &'a Value)>) {
    if entries.len() == 0 {
        return;
    }
    out.push(MARK);
    for (k, v) in entries {
        match k {
            Key::Value(k) => put(out, k),
            Key::Str(k) => put_str(out, k),
        }
        put(out, v);
    }
    out.push(SETITEMS);
}

fn put_int(out: &mut Vec<u8>, i: i64) {
    if (0..=0xff).contains(&i) {
        out.extend_from_slice(&[BININT1, i as u8]);
    } else if (0..=0xffff).contains(&i) {
        out.push(BININT2);
        out.extend_from_slice(&(i as u16).to_le_bytes());
    } else if let Ok(i) = i32::try_from(i) {
        out.push(BININT);
        out.extend_from_slice(&i.to_le_bytes());
    } else {
        // Shortest two's-complement little-endian bytes that keep the sign.
        let bytes = i.to_le_bytes();
        let mut n = bytes.len();
        while n > 1 {
            let (top, next) = (bytes[n - 1], bytes[n - 2]);
            if (top == 0 && next & 0x80 == 0) || (top == 0xff && next & 0x80 != 0) {
                n -= 1;
            } else {
                break;
            }
        }
        out.extend_from_slice(&[LONG1, n as u8]);
        out.extend_from_slice(&bytes[..n]);
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // BINUNICODE's length is 32 bits; no string we pickle comes near 4 GiB.
    let len = u32::try_from(s.len()).expect("string longer than 4 GiB cannot be pickled with protocol 2");
    out.push(BINUNICODE);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_tuple<'a>(out: &mut Vec<u8>, items: impl Iterator<Item = &'a Value>, len: usize) {
    match len {
        0 => out.push(EMPTY_TUPLE),
        1..=3 => {
            items.for_each(|item| put(out, item));
            out.push([TUPLE1, TUPLE2, TUPLE3][len - 1]);
        }
        _ => {
            out.push(MARK);
            items.for_each(|item| put(out, item));
            out.push(TUPLE);
        }
    }
}

fn put_global(out: &mut Vec<u8>, module: &str, name: &str) {
    out.push(GLOBAL);
    for part in [module, name] {
        out.extend_from_slice(part.as_bytes());
        out.push(b'\n');
    }
}

/// `collections.OrderedDict()`: the class called with no arguments.
fn put_ordered_dict_new(out: &mut Vec<u8>) {
    put_global(out, "collections", "OrderedDict");
    out.extend_from_slice(&[EMPTY_TUPLE, REDUCE]);
}

fn put_usizes(out: &mut Vec<u8>, items: &[usize]) {
    let items: Vec<Value> = items.iter().map(|&i| Value::Int(i as i64)).collect();
    put_tuple(out, items.iter(), items.len());
}

/// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False,
/// backward_hooks=OrderedDict())`, where `storage` is the persistent id
/// `('storage', torch.FloatStorage, key, 'cpu', numel)` that torch.load's `persistent_load` turns
/// into the storage read from `data/{key}`.
fn put_tensor(out: &mut Vec<u8>, t: &TensorRef) {
    put_global(out, "torch._utils", "_rebuild_tensor_v2");
    out.push(MARK);
    out.push(MARK);
    put_str(out, "storage");
    put_global(out, "torch", "FloatStorage");
    put_str(out, &t.storage.to_string());
    put_str(out, "cpu");
    put_int(out, t.storage_numel as i64);
    out.push(TUPLE);
    out.push(BINPERSID);
    put_int(out, t.offset as i64);
    put_usizes(out, &t.shape);
    put_usizes(out, &t.stride);
    out.push(NEWFALSE);
    put_ordered_dict_new(out);
    out.push(TUPLE);
    out.push(REDUCE);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_values_use_the_shortest_opcodes() {
        assert_eq!(to_bytes(&Value::None), b"\x80\x02N.");
        assert_eq!(to_bytes(&Value::Int(5)), b"\x80\x02K\x05.");
        assert_eq!(to_bytes(&Value::Int(300)), b"\x80\x02M\x2c\x01.");
        assert_eq!(to_bytes(&Value::Int(-1)), b"\x80\x02J\xff\xff\xff\xff.");
        // Python: pickle.dumps(2**31, 2) and pickle.dumps(-2**63, 2).
        assert_eq!(to_bytes(&Value::Int(1 << 31)), b"\x80\x02\x8a\x05\x00\x00\x00\x80\x00.");
        assert_eq!(to_bytes(&Value::Int(i64::MIN)), b"\x80\x02\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80.");
        assert_eq!(to_bytes(&Value::Float(1.5)), b"\x80\x02G\x3f\xf8\x00\x00\x00\x00\x00\x00.");
        assert_eq!(to_bytes(&Value::Tuple(vec![])), b"\x80\x02).");
    }

    #[test]
    fn containers_match_python() {
        // pickle.dumps({'a': [1, True], 'b': (None,)}, 2) without the memo (BINPUT) opcodes.
        let v = Value::dict([
            ("a", Value::List(vec![Value::Int(1), Value::Bool(true)])),
            ("b", Value::Tuple(vec![Value::None])),
        ]);
        assert_eq!(to_bytes(&v), b"\x80\x02}(X\x01\x00\x00\x00a](K\x01\x88eX\x01\x00\x00\x00bN\x85u.");
    }

    #[test]
    fn json_numbers_become_ints_or_floats() {
        let j: serde_json::Value = serde_json::json!({"i": 3, "f": 3.0, "l": [1, 2.5, null, "s"]});
        let v = Value::from(&j);
        let Value::Dict(entries) = v else { panic!("not a dict") };
        let get = |k: &str| entries.iter().find(|(key, _)| *key == Value::str(k)).map(|(_, v)| v.clone());
        assert_eq!(get("i"), Some(Value::Int(3)));
        assert_eq!(get("f"), Some(Value::Float(3.0)));
        assert_eq!(get("l"), Some(Value::List(vec![Value::Int(1), Value::Float(2.5), Value::None, Value::str("s")])));
    }

    #[test]
    fn views_are_checked_against_their_storage() {
        let t = |offset, shape: Vec<usize>, stride: Vec<usize>| TensorRef {
            storage: 0,
            storage_numel: 12,
            offset,
            shape,
            stride,
        };
        assert!(t(0, vec![3, 4], vec![4, 1]).check().is_ok());
        assert!(t(1, vec![3, 4], vec![4, 1]).check().is_err());
        assert!(t(0, vec![4, 3], vec![1, 4]).check().is_ok());
        assert!(t(50, vec![0, 4], vec![4, 1]).check().is_ok());
        assert!(t(0, vec![3], vec![4, 1]).check().is_err());
        assert_eq!(TensorRef::contiguous_stride(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(TensorRef::contiguous_stride(&[]), Vec::<usize>::new());
    }
}

#!/usr/bin/env python3
"""Checks that PyTorch, pickle and NumPy read the files cps3d's src/interop writes, and records
what they read in tests/golden/interop.json for the Rust test `interop::golden`.

For each file in tests/golden/interop/ it records the sha256 and the values read:
- *.pth: torch.load(map_location='cpu', weights_only=False), as nnU-Net's predictor loads
  checkpoints; the result as typed JSON (tensors: shape, stride, offset, storage sharing by
  untyped_storage().data_ptr(), sha256 and sum of the values). Checks, which must all pass:
  the same result with weights_only=True, with mmap=True and with calculate_storage_offsets;
  map_location='meta' gives the same shapes; storages start 64-byte aligned in the file; and for
  checkpoint_final.pth, a dynamic_network_architectures PlainConvUNet accepts the weights with
  load_state_dict(strict=True) and nnunetv2's nnUNetPredictor.initialize_from_trained_model_folder
  loads a model folder made from it ("skipped" where those packages are missing).
- *.pkl: pickle.load, as typed JSON.
- *.npz: np.load: names, dtype, shape, sha256 and sum of each array, and that it was deflated.

Run (the venv needs torch and numpy; dynamic_network_architectures and nnunetv2 optionally):
    CPS3D_WRITE_GOLDEN_INTEROP=1 cargo test --release -p cps3d --lib interop::golden
    /tmp/refvenv/bin/python scripts/reference/interop_check.py
then `cargo test --release -p cps3d --lib interop` checks that we still write those bytes.
"""

import collections
import hashlib
import json
import os
import pickle
import platform
import shutil
import struct
import sys
import tempfile
import zipfile

import numpy as np
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FILES = os.path.join(ROOT, "tests", "golden", "interop")
OUT = os.path.join(ROOT, "tests", "golden", "interop.json")


def sha256(b):
    return hashlib.sha256(b).hexdigest()


def typed(o, groups):
    """JSON that keeps Python's types apart (tuple vs list, int vs float, dict order)."""
    if o is None:
        return None
    if isinstance(o, bool):
        return {"bool": o}
    if isinstance(o, int):
        return {"int": o}
    if isinstance(o, float):
        # The bits, so that -0.0, inf and nan survive JSON.
        return {"float_bits": struct.unpack("<Q", struct.pack("<d", o))[0]}
    if isinstance(o, str):
        return {"str": o}
    if isinstance(o, list):
        return {"list": [typed(x, groups) for x in o]}
    if isinstance(o, tuple):
        return {"tuple": [typed(x, groups) for x in o]}
    if isinstance(o, collections.OrderedDict):
        return {"OrderedDict": [[typed(k, groups), typed(v, groups)] for k, v in o.items()]}
    if isinstance(o, dict):
        return {"dict": [[typed(k, groups), typed(v, groups)] for k, v in o.items()]}
    if isinstance(o, torch.Tensor) and o.device.type == "meta":
        return {"tensor": {"shape": list(o.shape), "stride": list(o.stride()), "storage_offset": o.storage_offset()}}
    if isinstance(o, torch.Tensor):
        assert o.dtype == torch.float32 and o.device.type == "cpu" and not o.requires_grad, o
        storage = o.untyped_storage()
        ptr = storage.data_ptr()
        if storage.nbytes() == 0:
            group = -1  # empty storages have no address of their own (0, or wherever mmap put them)
        else:
            if ptr not in groups:
                groups.append(ptr)
            group = groups.index(ptr)
        values = o.contiguous().numpy()
        return {"tensor": {
            "dtype": "float32",
            "shape": list(o.shape),
            "stride": list(o.stride()),
            "storage_offset": o.storage_offset(),
            "storage_numel": storage.nbytes() // 4,
            "storage_group": group,
            "sha256": sha256(values.astype("<f4").tobytes()),
            "sum": float(values.astype(np.float64).sum()),
        }}
    raise TypeError(f"unexpected {type(o)} in a loaded file")


def shapes_only(t):
    """typed() output with only the tensors' geometry (all that map_location='meta' gives)."""
    if isinstance(t, dict):
        if "tensor" in t:
            return {k: v for k, v in t["tensor"].items() if k in ("shape", "stride", "storage_offset")}
        return {k: shapes_only(v) for k, v in t.items()}
    if isinstance(t, list):
        return [shapes_only(x) for x in t]
    return t


def check_pth(path):
    checks = {}
    obj = torch.load(path, map_location="cpu", weights_only=False)
    read = typed(obj, [])
    checks["weights_only_true"] = typed(torch.load(path, map_location="cpu", weights_only=True), []) == read
    checks["mmap"] = typed(torch.load(path, mmap=True, weights_only=True), []) == read
    from torch.utils.serialization import config
    config.load.calculate_storage_offsets = True
    try:
        checks["calculate_storage_offsets"] = typed(torch.load(path, mmap=True, weights_only=True), []) == read
    finally:
        config.load.calculate_storage_offsets = False
    meta = torch.load(path, map_location="meta", weights_only=True)
    checks["meta_shapes"] = shapes_only(typed(meta, [])) == shapes_only(read)
    reader = torch._C.PyTorchFileReader(path)
    records = [r for r in reader.get_all_records() if r.startswith("data/")]
    checks["storages_64_byte_aligned"] = all(reader.get_record_offset(r) % 64 == 0 for r in records)
    if os.path.basename(path) == "checkpoint_final.pth":
        checks["plain_conv_unet_strict"] = check_plain_conv_unet(obj["network_weights"])
        checks["nnunet_predictor"] = check_nnunet_predictor(path, obj)
    return read, checks


def check_plain_conv_unet(weights):
    try:
        from dynamic_network_architectures.architectures.unet import PlainConvUNet
    except ImportError:
        return "skipped"
    net = PlainConvUNet(1, 3, (4, 8, 16), torch.nn.Conv3d, 3, ((1, 1, 1), (2, 2, 2), (2, 2, 2)), (2, 2, 2), 3,
                        (2, 2), True, torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None,
                        torch.nn.LeakyReLU, {"inplace": True}, deep_supervision=True)
    net.load_state_dict(weights, strict=True)
    mine = net.state_dict()
    assert list(mine) == list(weights), "state dict key order differs"
    assert all(torch.equal(mine[k], weights[k]) for k in mine)
    # The aliases share storage in the file as they do in the module.
    ptr = {k: v.untyped_storage().data_ptr() for k, v in weights.items()}
    mptr = {k: v.untyped_storage().data_ptr() for k, v in mine.items()}
    same = lambda p: {(a, b) for a in p for b in p if p[a] == p[b]}
    assert same(ptr) == same(mptr), "aliasing differs from PlainConvUNet's"
    return True


def check_nnunet_predictor(path, ckpt):
    try:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    except ImportError:
        return "skipped"
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "plans.json"), "w") as f:
            json.dump(ckpt["init_args"]["plans"], f)
        with open(os.path.join(d, "dataset.json"), "w") as f:
            json.dump(ckpt["init_args"]["dataset_json"], f)
        os.makedirs(os.path.join(d, "fold_0"))
        shutil.copy(path, os.path.join(d, "fold_0", "checkpoint_final.pth"))
        predictor = nnUNetPredictor(device=torch.device("cpu"), verbose=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(d, use_folds=(0,), checkpoint_name="checkpoint_final.pth")
        assert predictor.allowed_mirroring_axes == (0, 1, 2)
        with torch.no_grad():
            out = predictor.network(torch.zeros(1, 1, 16, 16, 16))
        assert tuple(out.shape) == (1, 3, 16, 16, 16), out.shape
    return True


def check_npz(path):
    with zipfile.ZipFile(path) as z:
        deflated = {i.filename: i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist()}
    arrays = {}
    with np.load(path) as f:
        for name in f.files:
            a = f[name]
            arrays[name] = {
                "dtype": str(a.dtype),
                "shape": list(a.shape),
                "sha256": sha256(np.ascontiguousarray(a).astype("<f4").tobytes()),
                "sum": float(a.astype(np.float64).sum()),
                "deflated": deflated[name + ".npy"],
            }
    return arrays


def dumps(o, indent=""):
    """JSON with one line per small value (a tensor, a short list), so that diffs stay readable."""
    flat = json.dumps(o, ensure_ascii=False)
    if len(flat) <= 400 or not isinstance(o, (dict, list)) or not o:
        return flat
    inner = indent + " "
    if isinstance(o, dict):
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {dumps(v, inner)}" for k, v in o.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    return "[\n" + ",\n".join(inner + dumps(v, inner) for v in o) + "\n" + indent + "]"


def main():
    names = sorted(n for n in os.listdir(FILES) if not n.startswith("."))
    if not names:
        sys.exit(f"no files in {FILES}: run CPS3D_WRITE_GOLDEN_INTEROP=1 cargo test --release -p cps3d --lib "
                 "interop::golden first")
    files = {}
    for name in names:
        path = os.path.join(FILES, name)
        with open(path, "rb") as f:
            record = {"sha256": sha256(f.read())}
        if name.endswith(".pth"):
            record["read"], record["checks"] = check_pth(path)
            failed = [k for k, v in record["checks"].items() if v is False]
            assert not failed, f"{name}: failed {failed}"
        elif name.endswith(".pkl"):
            with open(path, "rb") as f:
                record["read"] = typed(pickle.load(f), [])
        elif name.endswith(".npz"):
            record["arrays"] = check_npz(path)
        else:
            sys.exit(f"unexpected file {path}")
        files[name] = record
        print(f"{name}: ok", {k: v for k, v in record.get("checks", {}).items()} or "")
    out = {
        "generated_by": "scripts/reference/interop_check.py",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "files": files,
    }
    with open(OUT, "w") as f:
        f.write(dumps(out) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

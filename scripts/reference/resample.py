"""Golden values for src/preprocessing/resample.rs, produced by nnU-Net's own resampling code.

Writes tests/golden/resample.json with, from nnunetv2 2.8.1
(nnunetv2/preprocessing/resampling/default_resampling.py):
  - cases: small volumes resampled with resample_data_or_seg_to_shape and the settings of nnU-Net's
    default plans (images: is_seg=False, order=3, order_z=0; labels: is_seg=True, order=1, order_z=0;
    both force_separate_z=None), the target shape from compute_new_shape and the separate axis from
    determine_do_sep_z_and_axis. Cases: isotropic up- and downsampling, an exact factor-2 downsample
    (ties between labels), per-axis mixed factors, a separate axis from the current spacing (axis 0,
    up and down along it; axis 2 with a factor-2 nearest-neighbour downsample, i.e. rounding ties),
    a separate axis decided by the target spacing, two equally coarse axes (no separate axis), axes
    of 1 or 2 voxels (with and without a separate axis) and one longer axis (40 -> 53);
  - new_shape_checks: compute_new_shape on further shapes/spacings (incl. exact .5 products);
  - separate_checks: determine_do_sep_z_and_axis(None, current, target) on further spacings.

The inputs are defined by formulas that the Rust unit tests recompute (see image_value and
label_value below; both are mirrored in resample.rs). Outputs are flattened in C order.
Run from the repository root (no GPU needed):
    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install nnunetv2==2.8.1
    /tmp/refvenv/bin/python scripts/reference/resample.py
Generated with nnunetv2 2.8.1, batchgenerators 0.25.5, scikit-image 0.26.0, scipy 1.17.1 and
numpy 2.4.6 (also recorded in the JSON under "generated_by").
"""
import json
import os
from importlib.metadata import version

import numpy as np
from nnunetv2.preprocessing.resampling.default_resampling import (
    compute_new_shape,
    determine_do_sep_z_and_axis,
    resample_data_or_seg_to_shape,
)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "golden", "resample.json")


def image_value(shape):
    """v(z, y, x) = 100 sin(0.7 z + 0.3 y) cos(0.4 x) + 3 ((x y) mod 7), computed in float64, stored as float32."""
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    zf, yf, xf = z.astype(np.float64), y.astype(np.float64), x.astype(np.float64)
    v = 100.0 * np.sin(0.7 * zf + 0.3 * yf) * np.cos(0.4 * xf) + 3.0 * ((x * y) % 7).astype(np.float64)
    return v.astype(np.float32)


def label_value(shape):
    """Five labels: a half-space (1), a cylinder (2), thin oblique planes (3), one-voxel line pieces (4)."""
    nz, ny, nx = shape
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    lab = np.zeros(shape, dtype=np.uint8)
    lab[x + 2 * y > 3 * z + 8] = 1
    r = min(ny, nx) // 3
    lab[(y - ny // 2) ** 2 + (x - nx // 2) ** 2 <= r * r] = 2
    lab[(y + 2 * z) % 5 == 0] = 3
    lab[(x == nx // 4) & (y % 2 == 0)] = 4
    return lab


# name, input shape, current spacing, target spacing
CASES = [
    ("iso_up", (5, 7, 9), (1.0, 1.0, 1.0), (0.6, 0.6, 0.6)),
    ("iso_down", (12, 14, 16), (1.0, 1.0, 1.0), (1.7, 1.7, 1.7)),
    ("down_by_2_ties", (10, 12, 14), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0)),
    ("mixed_per_axis", (9, 11, 13), (1.0, 1.5, 0.8), (1.4, 1.0, 1.1)),
    ("separate_axis0_up", (6, 20, 22), (5.0, 0.8, 0.8), (2.5, 1.0, 1.0)),
    ("separate_axis0_down", (12, 10, 10), (4.0, 1.0, 1.0), (5.0, 1.2, 0.9)),
    ("separate_axis_from_target", (10, 16, 12), (2.0, 1.0, 1.0), (1.0, 4.0, 1.0)),
    ("separate_axis2_down_by_2", (10, 9, 8), (1.0, 1.0, 4.0), (1.3, 0.9, 8.0)),
    ("two_coarse_axes_no_separate", (6, 7, 20), (3.0, 3.0, 0.8), (1.5, 1.5, 0.8)),
    ("tiny_1_to_2", (1, 2, 9), (1.0, 1.0, 1.0), (0.5, 0.4, 1.3)),
    ("tiny_2_to_1", (2, 5, 6), (1.0, 1.0, 1.0), (2.0, 1.0, 0.5)),
    ("tiny_separate_axis_only", (2, 8, 8), (4.0, 1.0, 1.0), (1.0, 1.0, 1.0)),
    ("tiny_1_to_2_no_separate", (1, 2, 7), (1.0, 1.0, 1.0), (0.5, 0.7, 1.2)),
    ("tiny_2_to_1_no_separate", (2, 4, 5), (1.0, 1.0, 1.0), (2.0, 1.0, 0.8)),
    ("long_axis", (4, 6, 40), (1.0, 1.0, 1.0), (1.0, 1.0, 0.75)),
]

NEW_SHAPE_CHECKS = [
    ((11, 13, 7), (1.5, 0.5, 0.5), (1.0, 1.0, 1.0)),  # 16.5 -> 16, 6.5 -> 6, 3.5 -> 4 (half to even)
    ((100, 512, 512), (2.5, 0.7421875, 0.7421875), (2.5, 0.8, 0.8)),
    ((87, 301, 299), (3.0, 0.68, 0.68), (1.0, 0.97, 0.97)),
    ((33, 77, 91), (0.7, 0.3, 0.1), (0.3, 0.7, 0.7)),
    ((1, 2, 3), (1.0, 1.0, 1.0), (2.0, 4.0, 6.0)),
    ((64, 64, 64), (1.1, 1.3, 0.9), (1.7, 0.6, 1.9)),
    ((45, 250, 250), (5.0, 0.78125, 0.78125), (2.5, 0.78125, 0.78125)),
    ((9, 15, 21), (0.3, 0.9, 2.1), (0.6, 1.8, 4.2)),
]

SEPARATE_CHECKS = [
    ((5.0, 0.8, 0.8), (2.5, 1.0, 1.0)),
    ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),
    ((1.0, 1.0, 1.0), (4.0, 1.0, 1.0)),
    ((2.0, 1.0, 1.0), (1.0, 4.0, 1.0)),
    ((3.0, 3.0, 0.8), (1.5, 1.5, 0.8)),
    ((1.0, 1.0, 1.0), (4.0, 4.0, 1.0)),
    ((0.8, 0.8, 3.0), (0.8, 0.8, 3.0)),
    ((3.0, 1.0, 1.0), (1.0, 1.0, 1.0)),  # ratio exactly 3: not anisotropic
    ((3.0000001, 1.0, 1.0), (1.0, 1.0, 1.0)),
    ((0.24, 1.25, 1.25), (3.0, 0.8, 0.8)),  # current anisotropic with two coarse axes: no separate axis
    ((1.0, 1.0, 2.5), (1.0, 0.3, 1.0)),  # current isotropic enough, target decides (axis 0 and 2 tie)
    ((1.0, 2.0, 1.0), (1.0, 3.5, 0.9)),
    ((1.25, 0.5, 2.0), (0.5, 0.5, 2.0)),
]


def main():
    cases = []
    for name, shape, spacing, target in CASES:
        new_shape = [int(v) for v in compute_new_shape(shape, spacing, target)]
        do_sep, axis = determine_do_sep_z_and_axis(None, spacing, target)
        img = image_value(shape)
        lab = label_value(shape)
        out_img = resample_data_or_seg_to_shape(img[None], new_shape, spacing, target, is_seg=False, order=3,
                                                order_z=0, force_separate_z=None)[0]
        out_lab = resample_data_or_seg_to_shape(lab[None], new_shape, spacing, target, is_seg=True, order=1,
                                                order_z=0, force_separate_z=None)[0]
        assert out_img.dtype == np.float32 and list(out_img.shape) == new_shape
        assert out_lab.dtype == np.uint8 and list(out_lab.shape) == new_shape
        cases.append({
            "name": name,
            "shape": list(shape),
            "spacing": list(spacing),
            "target_spacing": list(target),
            "new_shape": new_shape,
            "separate_axis": int(axis) if do_sep else None,
            # float32 values written with 9 significant digits: they parse back to the same float32
            "image": [float("%.9g" % v) for v in out_img.ravel().tolist()],
            "labels": [int(v) for v in out_lab.ravel()],
        })
    new_shape_checks = [{
        "shape": list(s), "spacing": list(a), "target_spacing": list(b),
        "new_shape": [int(v) for v in compute_new_shape(s, a, b)],
    } for s, a, b in NEW_SHAPE_CHECKS]
    separate_checks = []
    for a, b in SEPARATE_CHECKS:
        do_sep, axis = determine_do_sep_z_and_axis(None, a, b)
        separate_checks.append({"spacing": list(a), "target_spacing": list(b),
                                "separate_axis": int(axis) if do_sep else None})
    golden = {
        "generated_by": {p: version(p) for p in ("nnunetv2", "batchgenerators", "scikit-image", "scipy", "numpy")},
        "cases": cases,
        "new_shape_checks": new_shape_checks,
        "separate_checks": separate_checks,
    }
    with open(OUT, "w") as f:
        json.dump(golden, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {os.path.normpath(OUT)}: {len(cases)} cases, {os.path.getsize(OUT)} bytes")
    for c in cases:
        print(f"  {c['name']}: {c['shape']} -> {c['new_shape']}, separate axis {c['separate_axis']}")


if __name__ == "__main__":
    main()

"""Golden values for cps3d's training data path, produced by nnU-Net's own code.

Writes tests/golden/augmentation.json with, from nnunetv2 2.8.1 and batchgeneratorsv2:
  - oversample: which samples of a batch nnU-Net forces to contain foreground
    (nnUNetDataLoader._oversample_last_XX_percent) for several batch sizes and percentages;
  - bbox: nnUNetDataLoader.get_bbox on fixed shapes, patch sizes and chosen voxels (the random
    calls are intercepted: for random boxes the bounds handed to np.random.randint are recorded);
  - initial_patch: nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size
    (dummy 2D rule, rotation range, enlarged patch) for several patch sizes;
  - noise: moments of the standard deviation GaussianNoiseTransform((0, 0.1)) draws;
  - spatial: SpatialTransform (nnU-Net's settings: bilinear image, one-hot bilinear labels with
    padding label -1, nearest tie-break) applied to a fixed volume with fixed angles and scales,
    in 3D, in nnU-Net's dummy-2D mode (Convert3DTo2DTransform around a 2D SpatialTransform), and
    on single slices as nnU-Net's 2D configuration augments them.

The inputs are defined by formulas that tests/augmentation_golden.rs (actors crate) recomputes.
Run in a throwaway venv (no GPU needed):
    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install nnunetv2==2.8.1
    /tmp/refvenv/bin/python scripts/reference/augmentation.py
"""
import json
import math
import os
import sys
from importlib.metadata import version

import numpy as np
import torch

from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

OUT = os.path.join(os.path.dirname(__file__), '..', '..', 'tests', 'golden', 'augmentation.json')


def oversampling():
    out = []
    for batch in range(1, 13):
        for p in (0.33, 0.5, 0.25, 0.0, 1.0):
            dl = object.__new__(nnUNetDataLoader)
            dl.batch_size = batch
            dl.oversample_foreground_percent = p
            out.append({'batch': batch, 'percent': p,
                        'forced': [bool(dl._oversample_last_XX_percent(i)) for i in range(batch)]})
    return out


def bbox_cases():
    cases = []
    # (data shape, initial patch, final patch, forced voxel or None)
    specs = [
        ((100, 120, 140), (150, 180, 170), (112, 160, 128), None),
        ((100, 120, 140), (150, 180, 170), (112, 160, 128), (3, 60, 139)),
        ((100, 120, 140), (150, 180, 170), (112, 160, 128), (99, 0, 70)),
        ((40, 50, 60), (20, 30, 34), (16, 24, 28), None),
        ((40, 50, 60), (20, 30, 34), (16, 24, 28), (0, 0, 0)),
        ((40, 50, 60), (20, 30, 34), (16, 24, 28), (39, 49, 59)),
        ((10, 11, 12), (20, 31, 34), (16, 24, 28), None),
        ((10, 11, 12), (20, 31, 34), (16, 24, 28), (5, 5, 5)),
        ((7, 200, 9), (7, 240, 13), (7, 200, 8), None),
        ((7, 200, 9), (7, 240, 13), (7, 200, 8), (6, 100, 8)),
        ((33, 33, 33), (33, 33, 33), (33, 33, 33), None),
        ((33, 33, 33), (16, 16, 16), (16, 16, 16), (20, 2, 31)),
    ]
    real_randint, real_choice = np.random.randint, np.random.choice
    for shape, initial, final, voxel in specs:
        dl = object.__new__(nnUNetDataLoader)
        dl.patch_size = initial
        dl.final_patch_size = final
        dl.need_to_pad = (np.array(initial) - np.array(final)).astype(int)
        dl.has_ignore = False
        dl.annotated_classes_key = (-1, 0, 1, 2)
        bounds = []

        def fake_randint(lo, hi):
            bounds.append([int(lo), int(hi) - 1])
            return int(lo)

        np.random.randint = fake_randint
        np.random.choice = lambda n: 0
        try:
            if voxel is None:
                lbs, _ = dl.get_bbox(np.array(shape), False, None)
                cases.append({'shape': shape, 'initial': initial, 'final': final, 'voxel': None,
                              'random_bounds': bounds})
            else:
                locations = {1: np.array([[0, *voxel]])}
                lbs, _ = dl.get_bbox(np.array(shape), True, locations)
                cases.append({'shape': shape, 'initial': initial, 'final': final, 'voxel': voxel,
                              'lower': [int(v) for v in lbs]})
        finally:
            np.random.randint, np.random.choice = real_randint, real_choice
    return cases


def initial_patch_sizes():
    out = []
    for patch in [(112, 160, 128), (16, 48, 48), (64, 192, 160), (20, 320, 256), (48, 96, 96), (32, 32, 32),
                  (24, 80, 96), (40, 224, 192), (512, 512), (256, 32)]:
        t = object.__new__(nnUNetTrainer)
        t.configuration_manager = type('C', (), {'patch_size': list(patch)})()
        t.print_to_log_file = lambda *a, **k: None
        rot, dummy2d, initial, mirror = t.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        out.append({'patch': patch, 'dummy_2d': bool(dummy2d), 'rotation_max_degrees': math.degrees(rot[1]),
                    'initial': [int(v) for v in initial], 'mirror_axes': list(mirror)})
    return out


def noise_moments():
    torch.manual_seed(0)
    np.random.seed(0)
    t = GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True)
    img = torch.zeros((1, 2, 2, 2))
    sig = np.array([float(t.get_parameters(image=img)['sigmas']) for _ in range(200000)])
    # The applied noise really has that standard deviation:
    t2 = GaussianNoiseTransform(noise_variance=(0.07, 0.07), p_per_channel=1, synchronize_channels=True)
    applied = t2(image=torch.zeros((1, 32, 32, 32)))['image'].std().item()
    return {'draws': len(sig), 'mean': sig.mean(), 'mean_square': (sig ** 2).mean(), 'min': sig.min(),
            'max': sig.max(), 'applied_std_for_sigma_0.07': applied}


def volume(shape):
    """The fixed source region: a smooth image and a label map with labels 0..4 and padding -1."""
    z, y, x = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing='ij')
    image = (np.sin(0.45 * z + 0.2 * y) * np.cos(0.3 * x) + 0.02 * (x - y) + 0.01 * z).astype(np.float32)
    seg = np.zeros(shape, dtype=np.int16)
    c = [(s - 1) / 2 for s in shape]
    r = np.sqrt(((z - c[0]) / 1.3) ** 2 + (y - c[1]) ** 2 + ((x - c[2]) / 1.1) ** 2)
    seg[r < shape[1] * 0.35] = 1
    seg[r < shape[1] * 0.2] = 2
    seg[(np.abs(y - x * 0.7 - 2) < 1.6) & (z > 2)] = 3
    seg[((x.astype(int) + 2 * y.astype(int) + 3 * z.astype(int)) % 11 == 0) & (seg == 1)] = 4
    # Outside the scan (the loader pads with -1): the first two x-columns and the last y-row.
    seg[:, :, :2] = -1
    seg[:, -1, :] = -1
    image[:, :, :2] = 0
    image[:, -1, :] = 0
    return image, seg


def spatial_cases():
    cases = []
    specs = [
        # region, patch, angles (radians, per axis) or None, scale or None, dummy 2d
        ((18, 30, 34), (12, 20, 24), (0.3, -0.2, 0.45), None, False),
        ((18, 30, 34), (12, 20, 24), None, 1.3, False),
        ((18, 30, 34), (12, 20, 24), None, 0.75, False),
        ((18, 30, 34), (12, 20, 24), (-0.5, 0.1, 0.2), 0.8, False),
        ((17, 31, 33), (12, 20, 24), (0.0, 0.0, 0.0), None, False),
        ((17, 31, 33), (12, 20, 24), None, None, False),
        ((6, 30, 34), (6, 20, 24), (2.5, 1.0), 1.2, True),
        ((6, 30, 34), (6, 20, 24), (-1.0, 0.7), None, True),
        ((6, 30, 34), (6, 20, 24), None, None, True),
        # A 2D configuration: one slice, batchgeneratorsv2's 2D SpatialTransform on (c, y, x).
        ((1, 30, 34), (1, 20, 24), (0.0, 0.8), 1.2, '2d'),
        ((1, 30, 34), (1, 20, 24), (0.0, -2.6), None, '2d'),
        ((1, 31, 29), (1, 20, 24), None, 0.8, '2d'),
    ]
    for region, patch, angles, scale, mode in specs:
        image, seg = volume(region)
        two_d = mode == '2d'
        dummy = mode is True
        p_rot = 1 if angles is not None else 0
        p_scale = 1 if scale is not None else 0
        rot = (lambda image, dim, a=angles: a[dim]) if angles is not None else 0
        st = SpatialTransform(patch[1:] if dummy or two_d else patch, patch_center_dist_from_border=0, random_crop=False,
                              p_elastic_deform=0, p_rotation=p_rot, rotation=rot, p_scaling=p_scale,
                              scaling=scale if scale is not None else 1, p_synchronize_scaling_across_axes=1,
                              bg_style_seg_sampling=False, border_mode_seg='constant', padding_value_seg=-1)
        t = ComposeTransforms([Convert3DTo2DTransform(), st, Convert2DTo3DTransform()]) if dummy else st
        if two_d:
            out = t(image=torch.from_numpy(image[0][None].copy()), segmentation=torch.from_numpy(seg[0][None].copy()))
        else:
            out = t(image=torch.from_numpy(image[None].copy()), segmentation=torch.from_numpy(seg[None].copy()))
        cases.append({'region': region, 'patch': patch, 'angles': angles, 'scale': scale, 'dummy_2d': dummy,
                      'two_d': two_d,
                      'image': [round(float(v), 7) for v in out['image'][0].numpy().ravel()],
                      'labels': [int(v) for v in out['segmentation'][0].numpy().ravel()]})
    return cases


def main():
    golden = {
        'generated_by': {k: version(k) for k in ('nnunetv2', 'batchgeneratorsv2', 'torch', 'numpy')},
        'script': 'scripts/reference/augmentation.py',
        'oversample': oversampling(),
        'bbox': bbox_cases(),
        'initial_patch': initial_patch_sizes(),
        'noise': noise_moments(),
        'spatial': spatial_cases(),
    }
    with open(OUT, 'w') as f:
        json.dump(golden, f, separators=(',', ':'))
    print(f'wrote {os.path.normpath(OUT)}', file=sys.stderr)


if __name__ == '__main__':
    main()

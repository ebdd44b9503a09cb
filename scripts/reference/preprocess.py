"""Golden values for cps3d's preprocessing of real CT: nnU-Net v2's DefaultPreprocessor.run_case on
the scans of ../shared/data/Dataset001_TSAbdomen, read with NibabelIOWithReorient (RAS, cps3d's
canonical order), CT normalisation with fixed statistics, three target spacings (one that resamples
without a separate axis, one whose target spacing makes z separate, and the LPS chest scan).

Writes tests/golden/preprocess.json: per case the shapes and crop box, voxel values at 4000 fixed
positions (as HU: value·std + mean) and labels there, label counts, and summary statistics. Nothing
of the scans themselves is committed beyond those samples. Run in a throwaway venv:
    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install nnunetv2==2.8.1
    /tmp/refvenv/bin/python scripts/reference/preprocess.py [path/to/shared/data]
"""
import json
import os
import sys
from importlib.metadata import version

import numpy as np

from nnunetv2.imageio.nibabel_reader_writer import NibabelIOWithReorient
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

HERE = os.path.dirname(__file__)
OUT = os.path.join(HERE, '..', '..', 'tests', 'golden', 'preprocess.json')
STATS = {'mean': 35.0, 'std': 420.0, 'percentile_00_5': -980.0, 'percentile_99_5': 1150.0}
CASES = [
    # (name, image, label, target spacing z, y, x)
    ('tsabd_iso', 'imagesTr/tsabd_0000.nii.gz', 'labelsTr/tsabd.nii.gz', [2.0, 3.5, 3.4]),
    ('tsabd_separate_z', 'imagesTr/tsabd_0000.nii.gz', 'labelsTr/tsabd.nii.gz', [6.4, 1.9, 1.8]),
    ('chest_lps_separate_z', 'imagesUnlabeled/chest_aorta_0000.nii.gz', None, [4.8, 1.2, 1.3]),
]
LABELS = {'background': 0, **{f'organ_{i}': i for i in range(1, 14)}}


def plans(spacing):
    kw = lambda is_seg, order: {'is_seg': is_seg, 'order': order, 'order_z': 0, 'force_separate_z': None}
    return {
        'dataset_name': 'Dataset001_TSAbdomen', 'plans_name': 'golden', 'transpose_forward': [0, 1, 2],
        'transpose_backward': [0, 1, 2], 'image_reader_writer': 'NibabelIOWithReorient',
        'original_median_spacing_after_transp': spacing, 'original_median_shape_after_transp': [1, 1, 1],
        'label_manager': 'LabelManager', 'experiment_planner_used': 'golden',
        'foreground_intensity_properties_per_channel': {'0': {**STATS, 'min': -1024.0, 'max': 3000.0, 'median': 0.0}},
        'configurations': {'3d_fullres': {
            'data_identifier': 'golden', 'preprocessor_name': 'DefaultPreprocessor', 'batch_size': 2,
            'patch_size': [16, 16, 16], 'median_image_size_in_voxels': [1, 1, 1], 'spacing': spacing,
            'normalization_schemes': ['CTNormalization'], 'use_mask_for_norm': [False],
            'resampling_fn_data': 'resample_data_or_seg_to_shape', 'resampling_fn_seg': 'resample_data_or_seg_to_shape',
            'resampling_fn_data_kwargs': kw(False, 3), 'resampling_fn_seg_kwargs': kw(True, 1),
            'resampling_fn_probabilities': 'resample_data_or_seg_to_shape',
            'resampling_fn_probabilities_kwargs': kw(False, 1),
            'architecture': {'network_class_name': 'x', 'arch_kwargs': {}, '_kw_requires_import': []},
            'batch_dice': True}},
    }


def main():
    data = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, '..', '..', '..', 'shared', 'data')
    root = os.path.join(data, 'Dataset001_TSAbdomen')
    out = {'generated_by': {k: version(k) for k in ('nnunetv2', 'numpy', 'scipy', 'scikit-image', 'nibabel')},
           'statistics': STATS, 'cases': []}
    for name, image, label, spacing in CASES:
        pm = PlansManager(plans(spacing))
        cm = pm.get_configuration('3d_fullres')
        pre = DefaultPreprocessor(verbose=False)
        dataset_json = {'channel_names': {'0': 'CT'}, 'labels': LABELS, 'file_ending': '.nii.gz'}
        img, seg, props = pre.run_case([os.path.join(root, image)], os.path.join(root, label) if label else None,
                                       pm, cm, dataset_json)
        hu = img[0].astype(np.float64) * STATS['std'] + STATS['mean']
        rng = np.random.RandomState(0)
        idx = [rng.randint(0, s, 4000) for s in hu.shape]
        case = {
            'name': name, 'image': image, 'label': label, 'target_spacing': spacing,
            'spacing_read': [float(v) for v in props['spacing']],
            'shape_before_cropping': [int(v) for v in props['shape_before_cropping']],
            'bbox': [[int(a), int(b)] for a, b in props['bbox_used_for_cropping']],
            'shape': list(hu.shape),
            'positions': [[int(a), int(b), int(c)] for a, b, c in zip(*idx)],
            'hu': [round(float(v), 4) for v in hu[tuple(idx)]],
            'hu_mean': float(hu.mean()), 'hu_min': float(hu.min()), 'hu_max': float(hu.max()),
        }
        if label:
            s = np.maximum(seg[0], 0)  # -1 (outside the nonzero mask) is background after augmentation
            case['labels'] = [int(v) for v in s[tuple(idx)]]
            case['label_counts'] = [int((s == c).sum()) for c in range(14)]
        out['cases'].append(case)
    with open(OUT, 'w') as f:
        json.dump(out, f, separators=(',', ':'))


if __name__ == '__main__':
    main()

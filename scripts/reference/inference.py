"""Golden values for cps3d's inference, produced by nnU-Net's own predictor on the nnU-Net model
folder that `cps3d export --nnunet` makes of the committed tiny model (tests/golden/inference/model).

First let the Rust test write that folder, the two inputs (one phantom scan as a RAS and as an LPS
file) and our own predictions with --save-probabilities:
    CPS3D_WRITE_GOLDEN_INFERENCE=1 cargo test --release --test nnunet_inference
then, in a throwaway venv:
    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install nnunetv2==2.8.1
    /tmp/refvenv/bin/python scripts/reference/inference.py
    /tmp/refvenv/bin/python scripts/reference/inference.py 2d
The second run does the same for the committed 2D model (tests/golden/inference_2d/model, a 2D
configuration: nnU-Net predicts slice by slice with in-plane tiles and mirrors y and x only) into
tests/golden/inference_2d.json.
It writes tests/golden/inference.json with
  - the sha256 of every exported file and input it read;
  - nnUNetPredictor.predict_sliding_window_return_logits (step 0.5, Gaussian) on a fixed volume, fold 0
    without mirroring and folds 0+1 with mirroring, at 400 fixed positions; once as nnU-Net runs it
    (logits accumulated in float16) and once with its accumulation buffers and Gaussian switched to
    float32 (its algorithm at cps3d's precision; the module's `torch.zeros` and `compute_gaussian` are
    wrapped for that run only);
  - predict_from_files (folds 0 and 1, step 0.5, no mirroring) of both inputs: the label map in
    RAS (z, y, x) order (zlib + base64) and softmax probabilities at 600 fixed points;
  - whether nnU-Net's own ensembling (merge_files over our .npz with our .pkl) writes our label map.
"""
import base64
import hashlib
import json
import os
import sys
import tempfile
import zlib
from importlib.metadata import version

import nibabel
import numpy as np
import torch

from nnunetv2.ensembling.ensemble import merge_files
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

HERE = os.path.dirname(__file__)
GOLDEN = os.path.join(HERE, '..', '..', 'tests', 'golden')
# `inference.py 2d` checks the 2D model (tests/golden/inference_2d → inference_2d.json).
NAME = 'inference_2d' if sys.argv[1:] == ['2d'] else 'inference'
FOLDER = os.path.join(GOLDEN, NAME)
MODEL = os.path.join(FOLDER, 'nnunet_model')
VOLUME = (22, 44, 46)


def sha256(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def volume():
    z, y, x = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in VOLUME], indexing='ij')
    v = 1.5 * np.sin(0.21 * z + 0.13 * y) * np.cos(0.17 * x) + 0.3 * np.cos(0.05 * x * y) - 0.4
    return v.astype(np.float32)[None]


def predictor(folds, mirror):
    p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror,
                        perform_everything_on_device=False, device=torch.device('cpu'), verbose=False,
                        verbose_preprocessing=False, allow_tqdm=False)
    p.initialize_from_trained_model_folder(MODEL, use_folds=folds, checkpoint_name='checkpoint_final.pth')
    return p


def float32_accumulation():
    """Runs nnU-Net's sliding window with float32 accumulation buffers and Gaussian."""
    import types
    import nnunetv2.inference.predict_from_raw_data as pfr
    import nnunetv2.inference.sliding_window_prediction as swp

    class Torch32(types.ModuleType):
        def __getattr__(self, k):
            return getattr(torch, k)

    t = Torch32('torch32')

    def zeros(*a, **k):
        if k.get('dtype') == torch.half:
            k['dtype'] = torch.float32
        return torch.zeros(*a, **k)

    t.zeros = zeros
    gaussian = swp.compute_gaussian.__wrapped__

    def gaussian32(tile, sigma_scale=1. / 8, value_scaling_factor=1, dtype=torch.float16, device=torch.device('cpu')):
        return gaussian(tile, sigma_scale, value_scaling_factor, torch.float32, device)

    saved = (pfr.torch, pfr.compute_gaussian)
    pfr.torch, pfr.compute_gaussian = t, gaussian32
    return lambda: setattr(pfr, 'torch', saved[0]) or setattr(pfr, 'compute_gaussian', saved[1])


def b64_f32(a):
    return base64.b64encode(np.ascontiguousarray(a, dtype='<f4').tobytes()).decode()


def canonical(path):
    """A label map in RAS (z, y, x) order, as cps3d reads it."""
    img = nibabel.as_closest_canonical(nibabel.load(path))
    return np.asarray(img.dataobj).astype(np.uint8).transpose(2, 1, 0)


def main():
    torch.set_num_threads(2)
    out = {'generated_by': {k: version(k) for k in ('nnunetv2', 'torch', 'nibabel', 'numpy')}, 'sha256': {},
           'inputs': {}}
    for rel in ['plans.json', 'dataset.json', 'fold_0/checkpoint_final.pth', 'fold_1/checkpoint_final.pth']:
        out['sha256'][rel] = sha256(os.path.join(MODEL, rel))
    rng = np.random.RandomState(0)
    positions = [[int(rng.randint(0, s)) for s in VOLUME] for _ in range(400)]
    out['positions'] = positions
    idx = tuple(np.array(positions).T)
    data = torch.from_numpy(volume())
    for key, folds, mirror in [('logits_fold0', (0,), False), ('logits_folds01_mirrored', (0, 1), True)]:
        p = predictor(folds, mirror)
        logits = p.predict_logits_from_preprocessed_data(data).float().numpy()
        out['classes'] = int(logits.shape[0])
        out[key] = b64_f32(logits[(slice(None),) + idx].T)
        restore = float32_accumulation()
        try:
            logits32 = p.predict_logits_from_preprocessed_data(data).float().numpy()
        finally:
            restore()
        out[key + '_float32_accumulation'] = b64_f32(logits32[(slice(None),) + idx].T)
        out[key + '_float16_vs_float32_max'] = float(np.abs(logits - logits32).max())
    p = predictor((0, 1), False)
    out['predictions'] = {}
    inputs = os.path.join(FOLDER, 'inputs')
    with tempfile.TemporaryDirectory() as tmp:
        names = sorted(os.listdir(inputs))
        for name in names:
            out['inputs'][name] = sha256(os.path.join(inputs, name))
        p.predict_from_files([[os.path.join(inputs, n)] for n in names], tmp, save_probabilities=True,
                             overwrite=True, num_processes_preprocessing=1, num_processes_segmentation_export=1)
        for name in names:
            case = name[:-len('_0000.nii.gz')]
            labels = canonical(os.path.join(tmp, case + '.nii.gz'))
            probs = np.load(os.path.join(tmp, case + '.npz'))['probabilities']
            rng = np.random.RandomState(1)
            samples = []
            for _ in range(600):
                k = int(rng.randint(0, probs.shape[0]))
                z, y, x = (int(rng.randint(0, s)) for s in probs.shape[1:])
                samples.append([z, y, x, k, float(probs[k, z, y, x])])
            # nnU-Net's ensembling of our own files must give our label map.
            ours = os.path.join(FOLDER, 'ours')
            merged = os.path.join(tmp, case + '_merged.nii.gz')
            dataset_json = json.load(open(os.path.join(MODEL, 'dataset.json')))
            pm = PlansManager(json.load(open(os.path.join(MODEL, 'plans.json'))))
            merge_files([os.path.join(ours, case + '.npz')], merged[:-len('.nii.gz')], dataset_json['file_ending'],
                        pm.image_reader_writer_class(), pm.get_label_manager(dataset_json), False)
            same = bool(np.array_equal(canonical(merged), canonical(os.path.join(ours, case + '.nii.gz'))))
            out['predictions'][case] = {
                'labels_canonical': base64.b64encode(zlib.compress(labels.tobytes(), 9)).decode(),
                'shape': list(labels.shape),
                'probabilities': samples,
                'nnunet_ensemble_of_our_npz_equals_our_labels': same,
            }
    with open(os.path.join(GOLDEN, NAME + '.json'), 'w') as f:
        json.dump(out, f, separators=(',', ':'))


if __name__ == '__main__':
    main()

"""End-to-end check: nnU-Net's own predictor on the model folder `cps3d export --nnunet` wrote, against
`cps3d predict` with the same weights, on real CT files (RAS and LPS) and phantoms.

    cps3d export RUN --nnunet --checkpoint final -o MODEL
    cps3d predict -i IMAGES -o OURS -m RUN --checkpoint final --no-lcc [--step S] [--tta]
    /tmp/refvenv/bin/python scripts/reference/e2e_predict.py MODEL IMAGES OURS [--step S] [--tta]

Runs nnUNetPredictor.predict_from_files (folds 0 and 1 = the two siblings, the same step, mirroring
only with --tta) into a temporary folder and prints, per case, the share of equal voxels and the
Dice of every organ either prediction contains, then the minimum over cases. Exits 1 if a case has
fewer than 99.8% equal voxels or an organ Dice below 0.99. Nothing here is used by the tests.
"""
import argparse
import os
import sys
import tempfile

import nibabel
import numpy as np
import torch

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('model')
    ap.add_argument('images')
    ap.add_argument('ours')
    ap.add_argument('--step', type=float, default=0.7)
    ap.add_argument('--tta', action='store_true')
    a = ap.parse_args()
    torch.set_num_threads(2)
    p = nnUNetPredictor(tile_step_size=a.step, use_gaussian=True, use_mirroring=a.tta,
                        perform_everything_on_device=False, device=torch.device('cpu'), verbose=False,
                        verbose_preprocessing=False, allow_tqdm=False)
    p.initialize_from_trained_model_folder(a.model, use_folds=(0, 1), checkpoint_name='checkpoint_final.pth')
    names = sorted(n for n in os.listdir(a.images) if n.endswith('.nii.gz'))
    worst_equal, worst_dice, ok = 1.0, 1.0, True
    with tempfile.TemporaryDirectory() as tmp:
        p.predict_from_files([[os.path.join(a.images, n)] for n in names], tmp, save_probabilities=False,
                             overwrite=True, num_processes_preprocessing=1, num_processes_segmentation_export=1)
        for n in names:
            case = n[:-len('_0000.nii.gz')] if n.endswith('_0000.nii.gz') else n[:-len('.nii.gz')]
            theirs_img = nibabel.load(os.path.join(tmp, case + '.nii.gz'))
            ours_img = nibabel.load(os.path.join(a.ours, case + '.nii.gz'))
            theirs = np.asarray(theirs_img.dataobj).astype(np.uint8)
            ours = np.asarray(ours_img.dataobj).astype(np.uint8)
            codes = ''.join(nibabel.aff2axcodes(nibabel.load(os.path.join(a.images, n)).affine))
            assert theirs.shape == ours.shape and np.allclose(theirs_img.affine, ours_img.affine, atol=1e-3), case
            equal = float((theirs == ours).mean())
            dices = {}
            for c in sorted(set(np.unique(theirs)) | set(np.unique(ours))):
                if c == 0:
                    continue
                t, o = theirs == c, ours == c
                dices[int(c)] = 2 * float((t & o).sum()) / float(t.sum() + o.sum())
            low = min(dices.values()) if dices else 1.0
            worst_equal, worst_dice = min(worst_equal, equal), min(worst_dice, low)
            ok &= equal >= 0.998 and low >= 0.99
            organs = ', '.join(f'{c}: {d:.4f}' for c, d in dices.items())
            print(f'{case} ({codes}, {ours.shape}): {100 * equal:.3f}% voxels equal; organ Dice {organs or "none"}')
    print(f'minimum over {len(names)} case(s): {100 * worst_equal:.3f}% voxels equal, organ Dice {worst_dice:.4f}')
    sys.exit(0 if ok else 1)


if __name__ == '__main__':
    main()

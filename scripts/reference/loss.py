"""Golden values for cps3d's loss: nnU-Net v2's Dice + cross-entropy with deep supervision
(nnUNetTrainer._build_loss: DC_and_CE_loss with MemoryEfficientSoftDiceLoss, smooth 1e-5, background
excluded, batch Dice, DeepSupervisionWrapper with weights 1/2^i, the lowest 0, normalised) and the
3D-CPS authors' combination (nnUNetTrainerV2_SSL.run_iteration: l = l_1 + l_2 + λ·(loss(p1, argmax p2)
+ loss(p2, argmax p1)), the CPS loss over cat(labeled, unlabeled)).

Inputs are formulas that src/training/loss.rs's golden test recomputes. Writes tests/golden/loss.json.
Run in a throwaway venv:
    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install nnunetv2==2.8.1
    /tmp/refvenv/bin/python scripts/reference/loss.py
"""
import json
import os
from importlib.metadata import version

import numpy as np
import torch

from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

OUT = os.path.join(os.path.dirname(__file__), '..', '..', 'tests', 'golden', 'loss.json')
CLASSES = 4
SHAPES = [(4, 6, 8), (2, 3, 4), (1, 2, 2)]


def logits(batch, shape, net):
    n = batch * CLASSES * int(np.prod(shape))
    i = np.arange(n, dtype=np.float64)
    v = 2.0 * np.sin(0.37 * i + 0.9 * net) + 0.5 * np.cos(0.05 * i * (net + 1))
    return torch.from_numpy(v.astype(np.float32).reshape(batch, CLASSES, *shape))


def target(batch, shape):
    b, z, y, x = np.meshgrid(*[np.arange(s) for s in (batch, *shape)], indexing='ij')
    t = (z * 7 + y * 3 + x + 2 * b) % CLASSES
    t[(x + y) % 5 == 0] = 0
    return torch.from_numpy(t[:, None].astype(np.int64))


def loss_fn(batch_dice):
    weights = np.array([1 / (2 ** i) for i in range(len(SHAPES))])
    weights[-1] = 0
    weights = weights / weights.sum()
    base = DC_and_CE_loss({'batch_dice': batch_dice, 'smooth': 1e-5, 'do_bg': False, 'ddp': False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    return DeepSupervisionWrapper(base, weights), weights


def main():
    out = {'generated_by': {k: version(k) for k in ('nnunetv2', 'torch')}, 'classes': CLASSES,
           'shapes': SHAPES, 'cases': []}
    for batch_dice in (True, False):
        loss, weights = loss_fn(batch_dice)
        labeled, unlabeled = 2, 1
        total = labeled + unlabeled
        p1 = [logits(total, s, 0) for s in SHAPES]
        p2 = [logits(total, s, 1) for s in SHAPES]
        y = [target(labeled, s) for s in SHAPES]
        sup1 = loss([p[:labeled] for p in p1], y).item()
        sup2 = loss([p[:labeled] for p in p2], y).item()
        y1 = [p.argmax(1, keepdim=True) for p in p1]
        y2 = [p.argmax(1, keepdim=True) for p in p2]
        cps1 = loss(p1, y2).item()
        cps2 = loss(p2, y1).item()
        lam = 0.5
        authors_total = sup1 + sup2 + (cps1 + cps2) * lam
        out['cases'].append({'batch_dice': batch_dice, 'labeled': labeled, 'unlabeled': unlabeled,
                             'ds_weights': list(weights), 'sup': [sup1, sup2], 'cps': [cps1, cps2],
                             'lambda': lam, 'authors_total': authors_total})
    with open(OUT, 'w') as f:
        json.dump(out, f, indent=1)


if __name__ == '__main__':
    main()

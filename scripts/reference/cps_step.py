"""The reference for cps3d's CPS-step benchmark: one CPS training step done the 3D-CPS authors' way
(nnUNetTrainerV2_SSL.run_iteration) with nnU-Net v2's own pieces — two PlainConvUNet siblings
(dynamic_network_architectures, instance norm, LeakyReLU(inplace=True), deep supervision),
DC_and_CE_loss (MemoryEfficientSoftDiceLoss, batch Dice, smooth 1e-5, no background) inside
DeepSupervisionWrapper, SGD (Nesterov 0.99, weight decay 3e-5), gradient clipping at 12 — on the CPU
in float32, for the network and patch of a cps3d plans.json. Prints seconds per step (after one
warm-up step) and the process's peak RSS.

    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install nnunetv2==2.8.1
    /tmp/refvenv/bin/python scripts/reference/cps_step.py PLANS.json [--steps 2] [--threads 2]
"""
import argparse
import json
import resource
import time

import numpy as np
import torch
from torch import nn

from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss


def build(net_spec):
    return PlainConvUNet(
        input_channels=net_spec['input_channels'],
        n_stages=len(net_spec['features_per_stage']),
        features_per_stage=net_spec['features_per_stage'],
        conv_op=nn.Conv3d,
        kernel_sizes=net_spec['kernel_sizes'],
        strides=net_spec['strides'],
        n_conv_per_stage=net_spec['n_conv_per_stage'],
        num_classes=net_spec['num_classes'],
        n_conv_per_stage_decoder=net_spec['n_conv_per_stage_decoder'],
        conv_bias=True,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={'eps': 1e-5, 'affine': True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={'inplace': True},
        deep_supervision=True,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('plans')
    ap.add_argument('--steps', type=int, default=2)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--patch', default=None, help='Z,Y,X (default: the plan\'s)')
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    plans = json.load(open(a.plans))
    conf = plans['configurations']['3d_fullres']
    spec = conf['network']
    patch = [int(v) for v in a.patch.split(',')] if a.patch else conf['patch_size']
    bl = bu = plans['cps']['labeled_batch']
    torch.manual_seed(0)
    nets = [build(spec), build(spec)]
    params = sum(p.numel() for p in nets[0].parameters())
    opts = [torch.optim.SGD(n.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5) for n in nets]
    strides = np.cumprod(np.array(spec['strides']), axis=0)
    n_out = len(spec['features_per_stage']) - 1
    weights = np.array([1 / (2 ** i) for i in range(n_out)])
    weights[-1] = 0
    weights = weights / weights.sum()
    loss = DeepSupervisionWrapper(
        DC_and_CE_loss({'batch_dice': True, 'smooth': 1e-5, 'do_bg': False, 'ddp': False}, {}, weight_ce=1,
                       weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss),
        weights)
    k = spec['num_classes']
    times = []
    for step in range(a.steps + 1):
        x = torch.randn(bl + bu, spec['input_channels'], *patch)
        targets = [torch.randint(0, k, (bl, 1, *[p // int(s) for p, s in zip(patch, strides[i])]))
                   for i in range(n_out)]
        t = time.perf_counter()
        outs = [n(x) for n in nets]
        with torch.no_grad():
            pseudo = [[o.argmax(1, keepdim=True) for o in out] for out in outs]
        sup = [loss([o[:bl] for o in out], targets) for out in outs]
        cps = loss(outs[0], pseudo[1]) + loss(outs[1], pseudo[0])
        total = sup[0] + sup[1] + 0.5 * cps
        for o in opts:
            o.zero_grad()
        total.backward()
        for n, o in zip(nets, opts):
            torch.nn.utils.clip_grad_norm_(n.parameters(), 12)
            o.step()
        if step > 0:
            times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB
    print(json.dumps({'torch': torch.__version__, 'parameters_per_network': params, 'patch': patch,
                      'batch': [bl, bu], 'threads': a.threads, 'seconds_per_step': float(np.mean(times)),
                      'peak_rss_gb': peak}))


if __name__ == '__main__':
    main()

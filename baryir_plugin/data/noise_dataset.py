"""Clean images with additive Gaussian noise added on the fly (the denoising source of the papers)."""
from __future__ import annotations

import os

import numpy as np
import torch
from basicsr.utils import img2tensor
from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils import data

from ..errors import OptionError
from . import checks
from .degradations import gaussian_noise
from .seeding import SeededDraws
from .stem_matched_dataset import clean_image_paths, open_file_client, read_clean_view


@DATASET_REGISTRY.register()
class GaussianNoiseDataset(SeededDraws, data.Dataset):
    """Pairs (clean + Gaussian noise, clean) made from a folder or LMDB of clean images.

    Every clean image appears once per sigma, so ``len = images * len(sigmas)`` and sample ``i`` uses
    sigma ``sigmas[i // images]``; its fine degradation label is that sigma's index.

    Options (YAML):
        dataroot_gt: folder (or ``.lmdb`` with ``io_backend: {type: lmdb}``) of clean images.
        sigmas: noise levels on the 0-255 scale, e.g. [15, 25, 50].
        io_backend: BasicSR FileClient options (disk or lmdb).
        phase: 'train' -> random crop of gt_size + dihedral augmentation (use_hflip, use_rot), fresh
            noise each time; otherwise the whole image and noise fixed per (seed, index).
        gt_size, use_hflip, use_rot: as in BasicSR's PairedImageDataset.
        noise_seed: seed of the fixed test-time noise (default 0).
        manual_seed: the run's seed; as the train set itself, each sample's crop, flips and noise then come
            from (seed, epoch, slot) of the plugin's sampler (see AllInOneDataset). Inside an
            AllInOneDataset the mixture does this for its sources.

    Returns dicts with ``lq``, ``gt`` (RGB CHW float tensors in [0, 1]), ``lq_path``, ``gt_path`` and
    ``degradation`` (the sigma index).
    """

    # the options it reads besides name, type, phase and scale (an unknown one is an error when it is built)
    option_keys = ('dataroot_gt', 'sigmas', 'io_backend', 'gt_size', 'use_hflip', 'use_rot', 'noise_seed',
                   'manual_seed')

    def __init__(self, opt: dict) -> None:
        super().__init__()
        self.opt = opt
        self.who = who = checks.dataset_label(opt, 'GaussianNoiseDataset')
        for key in ('dataroot_gt', 'sigmas'):
            if opt.get(key) is None:
                raise OptionError(f'{who}: option {key!r} is required.')
        sigmas = opt['sigmas'] if isinstance(opt['sigmas'], (list, tuple)) else [opt['sigmas']]
        try:
            self.sigmas: list[float] = [float(s) for s in sigmas]
        except (TypeError, ValueError):
            self.sigmas = []
        if not self.sigmas or any(not s >= 0 for s in self.sigmas) or any(isinstance(s, bool) for s in sigmas):
            raise OptionError(f'{who}: sigmas must be a non-empty list of numbers >= 0 (noise levels on the 0-255 '
                              f'scale), got {opt["sigmas"]!r}.')
        if opt.get('phase') == 'train' and not opt.get('gt_size'):
            raise OptionError(f'{who}: option gt_size (training crop size) is required in the train phase.')
        self.io_backend_opt = dict(opt.get('io_backend') or {'type': 'disk'})
        self.file_client = None
        self.paths = clean_image_paths(str(opt['dataroot_gt']), self.io_backend_opt, who)
        self.noise_seed = int(opt.get('noise_seed', 0))
        self._read_seed(opt, who)

    @property
    def degradation_names(self) -> list[str]:
        return [f'noise_{s:g}' for s in self.sigmas]

    def __len__(self) -> int:
        return len(self.paths) * len(self.sigmas)

    def _sample(self, index: int) -> dict:
        self.file_client = self.file_client or open_file_client(self.io_backend_opt)
        label, image_index = divmod(index, len(self.paths))
        sigma = self.sigmas[label]
        gt_path = self.paths[image_index]
        clean = read_clean_view(self.file_client, gt_path, self.opt, self.who)  # uint8 BGR
        if self.opt.get('phase') == 'train':
            noisy = gaussian_noise(clean, None, sigma)
        else:
            noisy = gaussian_noise(clean, np.random.default_rng((self.noise_seed, index)), sigma)
        gt, lq = img2tensor([clean.astype(np.float32) / 255.0, noisy.astype(np.float32) / 255.0], bgr2rgb=True,
                            float32=True)
        stem, ext = os.path.splitext(gt_path)
        return {'lq': lq, 'gt': gt, 'lq_path': f'{stem}_sigma{sigma:g}{ext}', 'gt_path': gt_path,
                'degradation': torch.tensor(label)}

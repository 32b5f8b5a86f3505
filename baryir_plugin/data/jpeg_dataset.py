"""Clean images with JPEG compression applied on the fly (the BSDS500 q10 out-of-distribution test)."""
from __future__ import annotations

import os

import cv2
import numpy as np
from basicsr.utils import img2tensor
from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils import data
from torchvision.transforms.functional import normalize

from ..errors import OptionError
from . import checks
from .seeding import SeededDraws
from .stem_matched_dataset import clean_image_paths, open_file_client, read_clean_view


def jpeg_compress(img: np.ndarray, quality: int) -> np.ndarray:
    """Encode a uint8 BGR image as JPEG at ``quality`` with OpenCV and decode it again (deterministic)."""
    ok, buf = cv2.imencode('.jpg', img, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise RuntimeError(f'cv2.imencode could not JPEG-encode an image of shape {img.shape}.')
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


@DATASET_REGISTRY.register()
class JPEGCompressionDataset(SeededDraws, data.Dataset):
    """Pairs (JPEG-compressed clean image, clean image) from a folder or LMDB of clean images.

    The LQ image is OpenCV's JPEG encode/decode of the uint8 BGR image at ``quality``, so the same image
    always gives the same LQ (no randomness beyond the training crop).

    Options (YAML):
        dataroot_gt: folder (or ``.lmdb`` with ``io_backend: {type: lmdb}``) of clean images.
        quality: JPEG quality, an integer in 1..100 (default 10, the benchmark's setting).
        io_backend: BasicSR FileClient options, disk (default) or lmdb.
        phase: 'train' -> random crop of ``gt_size`` and dihedral augmentation, then compression (so the
            8x8 JPEG blocks are aligned with the patch, as in a real JPEG); otherwise the whole image.
        gt_size, use_hflip, use_rot: as in BasicSR's PairedImageDataset (flips default true).
        mean, std: optional per-channel normalisation of both images.
        scale: must be 1 or absent.
        manual_seed: the run's seed; as the train set itself, each crop comes from (seed, epoch, slot) of
            the plugin's sampler (see AllInOneDataset).

    Returns dicts with ``lq``, ``gt`` (RGB CHW float tensors in [0, 1]), ``lq_path``
    (``<stem>_q<quality><ext>``, a name for saved results) and ``gt_path``.
    """

    # the options it reads besides name, type, phase and scale (an unknown one is an error when it is built)
    option_keys = ('dataroot_gt', 'quality', 'io_backend', 'gt_size', 'use_hflip', 'use_rot', 'mean', 'std',
                   'manual_seed')

    def __init__(self, opt: dict) -> None:
        super().__init__()
        self.opt = opt
        self.who = who = checks.dataset_label(opt, 'JPEGCompressionDataset')
        if not opt.get('dataroot_gt'):
            raise OptionError(f'{who}: option dataroot_gt (folder or LMDB of clean images) is required.')
        quality = opt.get('quality', 10)
        # bool is an int subclass: `quality: true` is a YAML slip, not quality 1
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise OptionError(f'{who}: quality must be an integer in 1..100, got {quality!r}.')
        self.quality = quality
        if opt.get('scale', 1) != 1:
            raise OptionError(f'{who}: scale must be 1, got {opt["scale"]!r}.')
        if opt.get('phase') == 'train' and not opt.get('gt_size'):
            raise OptionError(f'{who}: option gt_size (training crop size) is required in the train phase.')
        self.mean = opt.get('mean')
        self.std = opt.get('std')
        self._read_seed(opt, who)
        self.io_backend_opt = dict(opt.get('io_backend') or {'type': 'disk'})
        self.file_client = None
        self.paths = clean_image_paths(str(opt['dataroot_gt']), self.io_backend_opt, who)

    def __len__(self) -> int:
        return len(self.paths)

    def _sample(self, index: int) -> dict:
        self.file_client = self.file_client or open_file_client(self.io_backend_opt)
        gt_path = self.paths[index]
        clean = read_clean_view(self.file_client, gt_path, self.opt, self.who)
        lq = jpeg_compress(clean, self.quality)
        gt, lq = img2tensor([clean.astype(np.float32) / 255.0, lq.astype(np.float32) / 255.0], bgr2rgb=True,
                            float32=True)
        if self.mean is not None or self.std is not None:
            normalize(lq, self.mean, self.std, inplace=True)
            normalize(gt, self.mean, self.std, inplace=True)
        stem, ext = os.path.splitext(gt_path)
        return {'lq': lq, 'gt': gt, 'lq_path': f'{stem}_q{self.quality}{ext}', 'gt_path': gt_path}

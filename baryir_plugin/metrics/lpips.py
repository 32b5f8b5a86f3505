"""LPIPS (full reference; lower is better), AlexNet variant v0.1, from local weight files only.

R. Zhang, P. Isola, A. A. Efros, E. Shechtman, O. Wang, "The Unreasonable Effectiveness of Deep Features
as a Perceptual Metric", CVPR 2018, Eq. 1:

    d(x, x0) = sum_l 1/(H_l W_l) sum_{h,w} || w_l * (y_hat^l_hw - y_hat0^l_hw) ||_2^2

where y_hat^l are the channel-wise unit-normalised activations of layer l (AlexNet relu1..relu5) and w_l
the learned per-channel weights. As in the lpips package, a 1x1 convolution to one channel applies
stored weights v_l to the squared differences, sum_c v_lc d_c^2, which is the paper's squared weighted
norm with w_l = sqrt(v_l) (the v0.1 weights are non-negative).

Nothing is downloaded. Two local files are needed, named in the metric options:

- ``backbone_weights``: torchvision's ImageNet AlexNet state dict (``alexnet-owt-7be5be79.pth``,
  https://download.pytorch.org/models/alexnet-owt-7be5be79.pth, the file torchvision's
  ``AlexNet_Weights.IMAGENET1K_V1`` fetches). Only ``features.*`` is used; ``classifier.*`` may be absent.
- ``lpips_weights``: the lpips package's ``weights/v0.1/alex.pth`` (inside the PyPI wheel:
  ``pip download --no-deps lpips`` and unzip ``lpips/weights/v0.1/alex.pth``), keys
  ``lin0.model.1.weight`` .. ``lin4.model.1.weight``.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch
import torchvision
from torch import nn

from basicsr.metrics.metric_util import reorder_image
from basicsr.utils.registry import METRIC_REGISTRY

__all__ = ['LPIPSAlex', 'calculate_lpips', 'load_lpips_alex']

BACKBONE_SOURCE = ('torchvision\'s ImageNet AlexNet state dict alexnet-owt-7be5be79.pth '
                   '(https://download.pytorch.org/models/alexnet-owt-7be5be79.pth)')
LPIPS_SOURCE = ('the lpips package\'s weights/v0.1/alex.pth (inside the PyPI wheel: '
                '`pip download --no-deps lpips`, then unzip lpips/weights/v0.1/alex.pth)')


class LPIPSAlex(nn.Module):
    """LPIPS v0.1 with the AlexNet backbone; ``forward`` takes two RGB batches in [-1, 1].

    A new instance holds no weights (meta tensors) until :meth:`load_weights`; :func:`load_lpips_alex`
    builds a loaded, cached one.
    """

    # AlexNet feature taps relu1..relu5: torchvision ``features`` indices [0:2], [2:5], [5:8], [8:10], [10:12]
    STAGE_BOUNDS = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))
    CHANNELS = (64, 192, 384, 256, 256)
    # lpips' ScalingLayer: the ImageNet mean/std expressed for inputs in [-1, 1]
    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)
    EPS = 1e-10  # lpips' normalize_tensor guard against an all-zero feature vector

    def __init__(self) -> None:
        super().__init__()
        # Built on the meta device: parameters get their values from the weight files (load with
        # assign=True), so no random initialisation is computed and the unused classifier costs nothing.
        with torch.device('meta'):
            features = torchvision.models.alexnet(weights=None).features
            self.stages = nn.ModuleList(nn.Sequential(*features[a:b]) for a, b in self.STAGE_BOUNDS)
            self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in self.CHANNELS)
        self.register_buffer('shift', torch.tensor(self.SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('scale', torch.tensor(self.SCALE).view(1, 3, 1, 1), persistent=False)

    def load_weights(self, backbone_state: dict, lpips_state: dict) -> None:
        """Load a torchvision ``alexnet`` state dict and the lpips ``alex.pth`` state dict (strict)."""
        stage_state = {}
        for stage, (start, stop) in enumerate(self.STAGE_BOUNDS):
            for index in range(start, stop):
                for name in ('weight', 'bias'):
                    key = f'features.{index}.{name}'
                    if key in backbone_state:
                        stage_state[f'{stage}.{index - start}.{name}'] = backbone_state[key]
        unexpected = [k for k in backbone_state if not k.startswith(('features.', 'classifier.'))]
        if unexpected:
            raise ValueError(f'backbone_weights: unexpected keys {unexpected[:5]}; expected {BACKBONE_SOURCE}')
        try:
            self.stages.load_state_dict(stage_state, strict=True, assign=True)
        except RuntimeError as e:
            raise ValueError(f'backbone_weights: not an AlexNet state dict ({e}); expected {BACKBONE_SOURCE}') from e
        lin_state = {}
        for i in range(len(self.CHANNELS)):
            key = f'lin{i}.model.1.weight'
            if key not in lpips_state:
                raise ValueError(f'lpips_weights: key {key!r} missing (has {sorted(lpips_state)[:5]}); '
                                 f'expected {LPIPS_SOURCE}')
            lin_state[f'{i}.weight'] = lpips_state[key]
        try:
            self.lins.load_state_dict(lin_state, strict=True, assign=True)
        except RuntimeError as e:
            raise ValueError(f'lpips_weights: wrong shapes ({e}); expected {LPIPS_SOURCE}') from e

    @staticmethod
    def _unit_normalise(feat: torch.Tensor) -> torch.Tensor:
        # y_hat^l of the paper: each spatial position's channel vector scaled to unit length
        return feat / (feat.pow(2).sum(dim=1, keepdim=True).sqrt() + LPIPSAlex.EPS)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """Distances (N,) between two (N, 3, H, W) RGB batches in [-1, 1]."""
        h0, h1 = (x0 - self.shift) / self.scale, (x1 - self.shift) / self.scale
        total = x0.new_zeros(x0.shape[0])
        for stage, lin in zip(self.stages, self.lins):
            h0, h1 = stage(h0), stage(h1)
            diff = (self._unit_normalise(h0) - self._unit_normalise(h1)).pow(2)
            total = total + lin(diff).mean(dim=(1, 2, 3))  # spatial average of the one-channel map
        return total


def _resolve(path: str | os.PathLike | None, option: str, source: str) -> str:
    if path is None or str(path) == '':
        raise FileNotFoundError(f'calculate_lpips: option `{option}` is not set. LPIPS never downloads weights; '
                                f'set `{option}` in the metric options to a local copy of {source}')
    resolved = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isfile(resolved):
        raise FileNotFoundError(f'calculate_lpips: `{option}` file {path} does not exist; '
                                f'put a local copy of {source} there or fix the path')
    return resolved


@functools.lru_cache(maxsize=4)
def _cached_network(backbone_weights: str, lpips_weights: str, device: str) -> LPIPSAlex:
    net = LPIPSAlex()
    backbone = torch.load(backbone_weights, map_location='cpu', weights_only=True)
    lins = torch.load(lpips_weights, map_location='cpu', weights_only=True)
    for option, state in (('backbone_weights', backbone), ('lpips_weights', lins)):
        if not isinstance(state, dict):
            raise ValueError(f'calculate_lpips: `{option}` does not hold a state dict (got {type(state).__name__})')
    net.load_weights(backbone, lins)
    return net.to(device).eval().requires_grad_(False)


def load_lpips_alex(backbone_weights: str | os.PathLike | None, lpips_weights: str | os.PathLike | None,
                    device: str | torch.device | None = None) -> LPIPSAlex:
    """The LPIPS-Alex network built from two local files; cached per (paths, device).

    Args:
        backbone_weights: torchvision AlexNet state dict file (see the module docstring for the source).
        lpips_weights: lpips ``weights/v0.1/alex.pth`` file.
        device: where to run; default CUDA when available, else CPU.
    """
    backbone = _resolve(backbone_weights, 'backbone_weights', BACKBONE_SOURCE)
    lins = _resolve(lpips_weights, 'lpips_weights', LPIPS_SOURCE)
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    return _cached_network(backbone, lins, str(torch.device(device)))


def _to_tensor(img: np.ndarray, crop_border: int, input_order: str, device: str | torch.device) -> torch.Tensor:
    image = np.asarray(img)
    image = image[..., None] if image.ndim == 2 else reorder_image(image, input_order=input_order)
    if crop_border:
        image = image[crop_border:-crop_border, crop_border:-crop_border]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] != 3:
        raise ValueError(f'calculate_lpips expects BGR or single-channel images, got {image.shape[2]} channels')
    rgb = np.ascontiguousarray(image[..., ::-1], dtype=np.float32)  # BasicSR images are BGR; LPIPS wants RGB
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).to(device)
    return tensor / 127.5 - 1.0  # 0..255 -> [-1, 1]


@METRIC_REGISTRY.register()
def calculate_lpips(img: np.ndarray, img2: np.ndarray, crop_border: int = 0, input_order: str = 'HWC',
                    backbone_weights: str | None = None, lpips_weights: str | None = None,
                    device: str | None = None, **kwargs) -> float:
    """LPIPS-Alex v0.1 between a restored image and its ground truth (BGR, 0..255, as BasicSR passes them).

    Args:
        img, img2: images of the same size, (H, W, 3) BGR (or (3, H, W) with ``input_order: CHW``).
        crop_border: pixels removed from each edge before comparing.
        input_order: 'HWC' or 'CHW'.
        backbone_weights: local path of torchvision's AlexNet state dict (alexnet-owt-7be5be79.pth).
        lpips_weights: local path of the lpips package's weights/v0.1/alex.pth.
        device: 'cpu', 'cuda', 'cuda:1', ...; default CUDA when available.

    Returns:
        The LPIPS distance (0 for identical images; lower is better).

    Raises:
        FileNotFoundError: a weight option is unset or its file is missing (nothing is ever downloaded).
    """
    net = load_lpips_alex(backbone_weights, lpips_weights, device)
    device = next(net.parameters()).device
    x0 = _to_tensor(img, crop_border, input_order, device)
    x1 = _to_tensor(img2, crop_border, input_order, device)
    if x0.shape != x1.shape:
        raise ValueError(f'calculate_lpips: image sizes differ: {tuple(x0.shape[2:])} vs {tuple(x1.shape[2:])}')
    with torch.inference_mode():
        return float(net(x0, x1)[0])

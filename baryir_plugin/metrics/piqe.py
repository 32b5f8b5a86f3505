"""PIQE: Perception based Image Quality Evaluator (no reference; lower is better).

Venkatanath N., Praneeth D., Maruthi Chandrasekhar Bh., S. S. Channappayya, S. S. Medasani,
"Blind image quality evaluation using perception based features", NCC 2015.

The steps, thresholds and pooling follow the algorithm as MATLAB's ``piqe`` (Image Processing Toolbox)
implements it, so that scores are comparable with numbers computed there:

1. grayscale (MATLAB ``rgb2gray``), quantised to integers in 0..255;
2. pad to a multiple of 16 by replicating the last row/column ("post" padding; masks are cropped back;
   other choices via ``padding``, see :func:`piqe`);
3. MSCN coefficients: ``(I - mu) / (sigma + 1)`` with a 7x7 Gaussian window, sigma 7/6, replicate border;
4. 16x16 non-overlapping blocks; a block is *active* when the (unbiased) variance of its MSCN
   coefficients exceeds 0.1;
5. noticeable distortion: some 6-pixel segment of one of the block's four edges has std < 0.1;
6. noise: block std > 2 * beta, beta = |sigma - csd| / max(sigma, csd), csd = centre std / surround std;
7. score = (sum over active blocks of [noticeable] (1 - var) + [noise] var + 1) / (active blocks + 1) * 100.

Everything is vectorised over blocks with numpy; there is no per-block Python loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.ndimage import correlate1d

from basicsr.metrics.metric_util import reorder_image
from basicsr.utils.registry import METRIC_REGISTRY

__all__ = ['PIQEResult', 'calculate_piqe', 'mscn', 'piqe', 'rgb2gray_matlab']

BLOCK_SIZE = 16
ACTIVITY_THRESHOLD = 0.1  # block variance above which a block is "spatially active" (salient)
IMPAIRED_THRESHOLD = 0.1  # edge-segment std below which a block shows a noticeable artifact
SEGMENT_LENGTH = 6  # contiguous pixels per edge segment (11 overlapping segments per 16-pixel edge)
POOLING_C = 1.0  # the paper's positive constant that keeps the score finite without active blocks

# MATLAB's rgb2gray takes the luminance (Y) row of the inverse of the NTSC YIQ -> RGB matrix; rounded,
# these are the documented 0.2989, 0.5870, 0.1140. The exact row keeps uint8 rounding identical to MATLAB's.
_RGB_FROM_YIQ = np.array([[1.0, 0.956, 0.621], [1.0, -0.272, -0.647], [1.0, -1.106, 1.703]])
RGB2GRAY_WEIGHTS = np.linalg.inv(_RGB_FROM_YIQ)[0]

# The noise criterion's "centre" is the two middle columns (MATLAB columns 8 and 9, here 7 and 8).
# MATLAB deletes column 8 and then column 9 *of the already shortened block*, i.e. original column 10,
# so its "surround" excludes columns 7 and 9 (0-based) and still contains centre column 8. Read
# literally, the surround would be the other 14 columns; we keep MATLAB's selection so scores match it.
_CENTRE_COLUMNS = (7, 8)
_SURROUND_COLUMNS = tuple(c for c in range(BLOCK_SIZE) if c not in (7, 9))


@dataclass(frozen=True)
class PIQEResult:
    """PIQE score and its block-level masks, each the size of the input image (H, W), dtype bool.

    score: quality score, 0 (best) .. 100 (worst); a uniform image scores exactly 100.
    activity_mask: blocks considered spatially active (salient); only these are scored.
    noticeable_artifacts_mask: active blocks with a flat edge segment (blockiness / sudden artifacts).
    noise_mask: active blocks classified as noisy by the centre-surround criterion.
    """

    score: float
    activity_mask: np.ndarray
    noticeable_artifacts_mask: np.ndarray
    noise_mask: np.ndarray


def _round_half_away(x: np.ndarray) -> np.ndarray:
    # MATLAB's round() and its uint8 conversion round halves away from zero; np.round rounds to even.
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def rgb2gray_matlab(rgb: np.ndarray) -> np.ndarray:
    """MATLAB ``rgb2gray`` of an RGB image in 0..255: weights 0.2989 R + 0.5870 G + 0.1140 B, rounded.

    Returns a float64 (H, W) array of integers in 0..255 (what ``rgb2gray`` gives for uint8 input).
    """
    rgb = np.asarray(rgb, dtype=np.float64)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f'rgb2gray_matlab expects an (H, W, 3) image, got shape {rgb.shape}')
    return np.clip(_round_half_away(rgb @ RGB2GRAY_WEIGHTS), 0, 255)


def _gaussian_window(size: int = 7, sigma: float = 7 / 6) -> np.ndarray:
    # 1-D factor of MATLAB's fspecial('gaussian', 7, 7/6) / imgaussfilt(..., 'FilterSize', 7): sampled out
    # to 3 standard deviations and normalised to sum 1 (the 2-D window is the outer product of two).
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-x**2 / (2 * sigma**2))
    return w / w.sum()


def mscn(gray: np.ndarray) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients ``(I - mu) / (sigma + 1)`` (the paper's MSCN step).

    mu and sigma are local Gaussian-weighted mean and std (7x7, sigma 7/6, replicated borders).
    """
    image = np.asarray(gray, dtype=np.float64)
    window = _gaussian_window()

    def blur(x: np.ndarray) -> np.ndarray:
        # mode='nearest' is MATLAB's 'replicate' padding
        return correlate1d(correlate1d(x, window, axis=0, mode='nearest'), window, axis=1, mode='nearest')

    mu = blur(image)
    # abs(): E[x^2] - mu^2 can come out slightly negative in floating point (MATLAB does the same)
    sigma = np.sqrt(np.abs(blur(image * image) - mu * mu))
    return (image - mu) / (sigma + 1.0)


PADDING_MODES = ('replicate', 'symmetric', 'crop')


def piqe(gray: np.ndarray, padding: str = 'replicate') -> PIQEResult:
    """PIQE of a grayscale image with values in 0..255 (uint8 or float); lower score = better quality.

    Args:
        gray: (H, W) array. Values are rounded to integers first, as MATLAB's ``round(255*im2double(I))``
            does for an 8-bit image.
        padding: how a size that is not a multiple of 16 is handled (masks are always (H, W)).
            'replicate' (default): pad after the last row/column by repeating it, as MATLAB's ``piqe``
            does. The repeated rows are flat, so the edge blocks they fill tend to be flagged as
            "noticeable artifacts": on 481x321 photos (CBSD68, Rain100L) it scored 0.9 to 6.8 points
            higher than the other two modes.
            'symmetric': mirror padding, as the ``pypiqe`` package does.
            'crop': drop the last ``H % 16`` rows and ``W % 16`` columns (masks are False there).

    Returns:
        PIQEResult with the score and the activity / noticeable-artifact / noise masks.
    """
    gray = np.asarray(gray)
    if gray.ndim != 2 or gray.size == 0:
        raise ValueError(f'piqe expects a non-empty 2-D grayscale image, got shape {gray.shape}; '
                         'convert colour images with rgb2gray_matlab (or use calculate_piqe on BGR input)')
    image = gray.astype(np.float64)
    if not np.isfinite(image).all():
        raise ValueError('piqe: the image contains NaN or infinite values')
    if padding not in PADDING_MODES:
        raise ValueError(f'piqe: padding={padding!r} is not one of {PADDING_MODES}')
    image = _round_half_away(image)

    height, width = image.shape
    if padding == 'crop':
        image = image[:height - height % BLOCK_SIZE, :width - width % BLOCK_SIZE]
        if image.size == 0:
            raise ValueError(f'piqe: a {height}x{width} image has no whole 16x16 block; use padding="replicate"')
    else:
        pad_rows, pad_cols = -height % BLOCK_SIZE, -width % BLOCK_SIZE
        # MATLAB: padarray(I, [pad_rows pad_cols], 'replicate', 'post'); numpy calls replicate 'edge'
        mode = 'edge' if padding == 'replicate' else 'symmetric'
        image = np.pad(image, ((0, pad_rows), (0, pad_cols)), mode=mode)

    norm = mscn(image)
    rows, cols = norm.shape[0] // BLOCK_SIZE, norm.shape[1] // BLOCK_SIZE
    # (rows, cols, 16, 16): block (i, j) is norm[16i:16i+16, 16j:16j+16]
    blocks = norm.reshape(rows, BLOCK_SIZE, cols, BLOCK_SIZE).swapaxes(1, 2)

    variance = blocks.var(axis=(2, 3), ddof=1)  # MATLAB var(): unbiased
    active = variance > ACTIVITY_THRESHOLD

    # Noticeable distortion criterion (paper, block-level distortion estimation): every edge (top, right, bottom, left) is cut into
    # 11 overlapping segments of 6 contiguous pixels; a segment with std below the threshold is an
    # impaired (flat) segment, and one such segment marks the whole block.
    edges = np.stack([blocks[..., 0, :], blocks[..., :, -1], blocks[..., -1, :], blocks[..., :, 0]], axis=2)
    segments = sliding_window_view(edges, SEGMENT_LENGTH, axis=-1)  # (rows, cols, 4, 11, 6)
    impaired = (segments.std(axis=-1, ddof=1) < IMPAIRED_THRESHOLD).any(axis=(2, 3))

    # Noise criterion (paper, block-level distortion estimation): centre-surround std ratio against the block std.
    sigma = np.sqrt(variance)
    centre_std = blocks[..., list(_CENTRE_COLUMNS)].std(axis=(2, 3), ddof=1)
    surround_std = blocks[..., list(_SURROUND_COLUMNS)].std(axis=(2, 3), ddof=1)
    with np.errstate(divide='ignore', invalid='ignore'):
        # MATLAB replaces a NaN ratio (0/0) by 0; an infinite ratio stays and makes beta NaN, which then
        # fails the comparison below (not noisy) exactly as in MATLAB.
        csd = np.nan_to_num(centre_std / surround_std, nan=0.0, posinf=np.inf, neginf=-np.inf)
        beta = np.abs(sigma - csd) / np.maximum(sigma, csd)
        noisy = sigma > 2 * beta

    noticeable = active & impaired
    noise = active & noisy
    # Pooling (the paper's score): only active blocks count; noticeable distortion weighs (1 - var), noise var.
    distortion = np.where(noticeable, 1.0 - variance, 0.0) + np.where(noise, variance, 0.0)
    score = (distortion.sum() + POOLING_C) / (POOLING_C + active.sum()) * 100.0

    def to_pixels(block_mask: np.ndarray) -> np.ndarray:
        full = np.zeros((max(height, norm.shape[0]), max(width, norm.shape[1])), dtype=bool)
        full[:norm.shape[0], :norm.shape[1]] = np.repeat(np.repeat(block_mask, BLOCK_SIZE, axis=0), BLOCK_SIZE, axis=1)
        return full[:height, :width]

    return PIQEResult(score=float(score), activity_mask=to_pixels(active),
                      noticeable_artifacts_mask=to_pixels(noticeable), noise_mask=to_pixels(noise))


@METRIC_REGISTRY.register()
def calculate_piqe(img: np.ndarray, crop_border: int = 0, input_order: str = 'HWC', padding: str = 'replicate',
                   **kwargs) -> float:
    """PIQE of a restored image as BasicSR's validation passes it (no reference; lower is better).

    The BGR image (``tensor2img`` output, 0..255) is converted to gray with MATLAB's ``rgb2gray`` weights
    applied to RGB: ``0.2989 R + 0.5870 G + 0.1140 B``, rounded to integers. A single-channel image is
    used as is. ``img2`` (the ground truth BasicSR passes when it has one) is ignored.

    Args:
        img: (H, W, 3) BGR, (3, H, W) with ``input_order: CHW``, or (H, W) / (H, W, 1) gray; range 0..255.
        crop_border: pixels removed from each edge before scoring (as for BasicSR's PSNR/NIQE).
        input_order: 'HWC' or 'CHW'.
        padding: 'replicate' (MATLAB, default), 'symmetric' (pypiqe) or 'crop'; see :func:`piqe`.

    Returns:
        The PIQE score (0 best .. 100 worst).
    """
    image = np.asarray(img)
    if image.ndim == 2:  # reorder_image would transpose an (H, W) image for input_order='CHW'
        image = image[..., None]
    else:
        image = reorder_image(image, input_order=input_order)
    if crop_border:
        if 2 * crop_border >= min(image.shape[:2]):
            raise ValueError(f'crop_border={crop_border} removes the whole {image.shape[0]}x{image.shape[1]} '
                             'image; use a smaller crop_border')
        image = image[crop_border:-crop_border, crop_border:-crop_border]
    if image.shape[2] == 3:
        gray = rgb2gray_matlab(image[..., ::-1])  # BGR -> RGB
    elif image.shape[2] == 1:
        gray = image[..., 0]
    else:
        raise ValueError(f'calculate_piqe expects a BGR or single-channel image, got {image.shape[2]} channels')
    return piqe(gray, padding=padding).score

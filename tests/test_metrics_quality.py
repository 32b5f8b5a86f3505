"""No-reference (PIQE, NIQE) and perceptual (LPIPS) metrics, through BasicSR's METRIC_REGISTRY."""
from __future__ import annotations

import socket

import cv2
import numpy as np
import pytest
import torch

from basicsr.metrics import calculate_metric
from baryir_plugin.metrics import LPIPSAlex, calculate_lpips, calculate_piqe, load_lpips_alex
from baryir_plugin.metrics.piqe import RGB2GRAY_WEIGHTS, piqe, rgb2gray_matlab
from tests.conftest import shared_path

# (folder, first N files in sorted order) of ../shared/data used for the PIQE parity check
PARITY_SETS = (('CBSD68', 3), ('Kodak24', 3), ('RNI15', 3))
NOISE_SIGMA = 25.0
BLUR_SIGMA = 3.0
# Where both implementations run the same algorithm they differ only by floating-point summation order
# (measured: < 1e-11 points). A single block classified differently moves the score by roughly
# score / (active blocks + 1), i.e. > 0.01 points on these photos, and the masks are compared exactly.
PIQE_TOLERANCE = 1e-6


def _read(path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f'cannot read {path}'
    return image


def _noisy(image: np.ndarray, sigma: float = NOISE_SIGMA, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(image + rng.normal(0.0, sigma, image.shape), 0, 255).round().astype(np.uint8)


def _blurred(image: np.ndarray, sigma: float = BLUR_SIGMA) -> np.ndarray:
    return cv2.GaussianBlur(image, (0, 0), sigma)


@pytest.fixture(scope='module')
def sharp_photo() -> np.ndarray:
    folder = shared_path('data', 'CBSD68')
    return _read(sorted(folder.glob('*.png'))[0])


# --------------------------------------------------------------------------------------------------
# PIQE
def test_piqe_matches_pypiqe_on_real_images():
    """Score and all three masks agree with pypiqe (an independent port of MATLAB's ``piqe``).

    pypiqe deviates from MATLAB's algorithm in three places, so both are fed inputs on which those steps
    coincide: (1) colour: pypiqe uses OpenCV's BGR2GRAY (0.299/0.587/0.114, fixed point), MATLAB and we
    use ``rgb2gray`` (0.2989/0.5870/0.1140) -> both get our grayscale image; (2) range: pypiqe scales by
    the image's own maximum (``255 * I / max(I)``), MATLAB by the type range (``im2double``) -> images whose
    maximum is below 255 are stretched first, making pypiqe's scaling the identity; (3) size: pypiqe pads
    to a multiple of 16 by mirroring, MATLAB (our default) by replicating the last row/column -> we run
    with ``padding='symmetric'`` (CBSD68/RNI15 are not multiples of 16, so this path is exercised).
    Both keep MATLAB's centre-surround column selection (see baryir_plugin/metrics/piqe.py).
    Images: 3 each of CBSD68, Kodak24, RNI15, plus a noisy (sigma 25) and a blurred (sigma 3) CBSD68 photo.
    """
    pypiqe = pytest.importorskip('pypiqe', reason='pypiqe is the test-only reference (pip install pypiqe)')
    cases = []
    for folder, count in PARITY_SETS:
        files = sorted(p for p in shared_path('data', folder).iterdir() if p.suffix.lower() in ('.png', '.tif'))
        cases += [(f'{folder}/{p.name}', _read(p)) for p in files[:count]]
    first_name, first = cases[0]
    cases += [(f'{first_name}+noise{NOISE_SIGMA:g}', _noisy(first)),
              (f'{first_name}+blur{BLUR_SIGMA:g}', _blurred(first))]

    deviations = {}
    for name, bgr in cases:
        gray = rgb2gray_matlab(bgr[..., ::-1])
        if gray.max() < 255:
            gray = np.round(255 * gray / gray.max())
        gray = gray.astype(np.uint8)
        ref_score, ref_noticeable, ref_noise, ref_activity = pypiqe.piqe(gray)  # pypiqe's return order
        ours = piqe(gray, padding='symmetric')
        deviations[name] = abs(ours.score - ref_score)
        assert np.array_equal(ours.activity_mask, ref_activity), name
        assert np.array_equal(ours.noticeable_artifacts_mask, ref_noticeable), name
        assert np.array_equal(ours.noise_mask, ref_noise), name
    worst = max(deviations, key=deviations.get)
    assert deviations[worst] < PIQE_TOLERANCE, f'{worst}: |ours - pypiqe| = {deviations[worst]:.3g}'
    assert any(p.shape[0] % 16 or p.shape[1] % 16 for _, p in cases), 'no image exercised the padding'


def test_piqe_ranks_noise_and_blur_worse(sharp_photo):
    clean = calculate_piqe(sharp_photo)
    noisy = calculate_piqe(_noisy(sharp_photo))
    blurred = calculate_piqe(_blurred(sharp_photo))
    assert 0 <= clean < 100
    assert noisy > clean + 5, (clean, noisy)
    assert blurred > clean + 5, (clean, blurred)


def test_piqe_constant_image_scores_100():
    # No active block: the score is C / C * 100 (MATLAB documents 100 for a uniform image).
    for value in (0, 77, 255):
        result = piqe(np.full((50, 70), value, dtype=np.uint8))
        assert result.score == 100.0
        assert result.activity_mask.shape == (50, 70) and not result.activity_mask.any()
    assert calculate_piqe(np.full((40, 40, 3), 128, dtype=np.uint8)) == 100.0


def test_piqe_sizes_and_padding(sharp_photo):
    gray = rgb2gray_matlab(sharp_photo[..., ::-1])
    odd = gray[:37, :53]
    for padding in ('replicate', 'symmetric', 'crop'):
        result = piqe(odd, padding=padding)
        assert np.isfinite(result.score), padding
        for mask in (result.activity_mask, result.noticeable_artifacts_mask, result.noise_mask):
            assert mask.shape == (37, 53) and mask.dtype == bool
    # The default pads by replicating the last row/column (MATLAB's padarray 'replicate', 'post').
    padded = np.pad(odd, ((0, 11), (0, 11)), mode='edge')
    assert piqe(odd).score == pytest.approx(piqe(padded).score, abs=1e-12)
    # 'crop' scores only the whole blocks; masks are False outside them.
    cropped = piqe(odd, padding='crop')
    assert cropped.score == pytest.approx(piqe(odd[:32, :48]).score, abs=1e-12)
    assert not cropped.activity_mask[32:].any() and not cropped.activity_mask[:, 48:].any()
    # On a multiple of 16 the padding choice does not matter.
    exact = gray[:320, :320]
    assert len({piqe(exact, padding=p).score for p in ('replicate', 'symmetric', 'crop')}) == 1
    # Smaller than one block still works with padding.
    assert np.isfinite(piqe(gray[:5, :7]).score)
    with pytest.raises(ValueError, match='padding'):
        piqe(odd, padding='reflect')
    with pytest.raises(ValueError, match='no whole 16x16 block'):
        piqe(gray[:5, :7], padding='crop')


def test_piqe_grayscale_conversion_is_matlab_rgb2gray():
    # MATLAB: rgb2gray(uint8(cat(3, 255, 0, 0))) = 76, green -> 150, blue -> 29
    pure = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8)  # RGB
    assert rgb2gray_matlab(pure).tolist() == [[76.0, 150.0, 29.0]]
    rng = np.random.default_rng(1)
    bgr = rng.integers(0, 256, (48, 64, 3)).astype(np.uint8)
    # MATLAB's exact coefficients (first row of the inverse NTSC matrix) round to the documented ones
    assert np.allclose(RGB2GRAY_WEIGHTS, [0.2989, 0.5870, 0.1140], atol=5e-5)
    b, g, r = (bgr[..., i].astype(np.float64) for i in range(3))
    wr, wg, wb = RGB2GRAY_WEIGHTS
    expected = piqe(np.round(wr * r + wg * g + wb * b)).score  # channel order: input is BGR
    assert calculate_piqe(bgr) == pytest.approx(expected, abs=1e-9)
    assert calculate_piqe(bgr) != pytest.approx(calculate_piqe(bgr[..., ::-1].copy()), abs=1e-6)


def test_piqe_crop_border_and_input_order(sharp_photo):
    gray = rgb2gray_matlab(sharp_photo[..., ::-1])
    assert calculate_piqe(sharp_photo, crop_border=8) == pytest.approx(piqe(gray[8:-8, 8:-8]).score, abs=1e-12)
    assert calculate_piqe(sharp_photo, crop_border=8) != pytest.approx(calculate_piqe(sharp_photo), abs=1e-6)
    chw = np.ascontiguousarray(sharp_photo.transpose(2, 0, 1))
    assert calculate_piqe(chw, input_order='CHW') == calculate_piqe(sharp_photo)
    assert calculate_piqe(gray, input_order='CHW') == piqe(gray).score  # (H, W) ignores input_order
    with pytest.raises(ValueError, match='crop_border'):
        calculate_piqe(sharp_photo[:20, :20], crop_border=10)


def test_piqe_through_basicsr_registry(sharp_photo):
    opt = {'type': 'calculate_piqe', 'crop_border': 0, 'better': 'lower'}
    other = _noisy(sharp_photo)
    value = calculate_metric({'img': sharp_photo, 'img2': other}, opt)  # img2 (the GT) is ignored
    assert value == calculate_piqe(sharp_photo)
    assert calculate_metric({'img': sharp_photo}, opt) == value


# --------------------------------------------------------------------------------------------------
# NIQE (BasicSR's own implementation)
def test_niqe_offline_through_registry(sharp_photo, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError(f'network access attempted: {args[1:]}')

    monkeypatch.setattr(socket.socket, 'connect', no_network)
    monkeypatch.setattr(socket.socket, 'connect_ex', no_network)
    opt = {'type': 'calculate_niqe', 'crop_border': 0}
    clean = calculate_metric({'img': sharp_photo}, opt)
    noisy = calculate_metric({'img': _noisy(sharp_photo), 'img2': sharp_photo}, opt)
    assert np.isfinite(clean) and np.isfinite(noisy)
    assert noisy > clean, (clean, noisy)


# --------------------------------------------------------------------------------------------------
# LPIPS with generated weight files (the real ones are never downloaded)
def _random_backbone_state(seed: int) -> dict:
    """A features-only torchvision AlexNet state dict (He-scaled random weights)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
    state = {}
    for index, shape in shapes.items():
        fan_in = shape[1] * shape[2] * shape[3]
        state[f'features.{index}.weight'] = torch.randn(shape, generator=gen) * (2.0 / fan_in)**0.5
        state[f'features.{index}.bias'] = torch.zeros(shape[0])
    return state


def _random_lpips_state(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    # v0.1 linear weights are non-negative (lpips clamps them during training)
    return {f'lin{i}.model.1.weight': torch.rand((1, c, 1, 1), generator=gen) for i, c in enumerate(LPIPSAlex.CHANNELS)}


@pytest.fixture(scope='module')
def lpips_files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp('lpips_weights')
    backbone, lins = folder / 'alexnet_features.pth', folder / 'alex.pth'
    torch.save(_random_backbone_state(0), backbone)
    torch.save(_random_lpips_state(1), lins)
    return {'backbone_weights': str(backbone), 'lpips_weights': str(lins), 'device': 'cpu'}


@pytest.fixture(scope='module')
def image_pair() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:72, 0:96]
    base = np.stack([xx * 2.5, yy * 3.0, (xx + yy) * 1.5], axis=-1) + rng.normal(0, 10, (72, 96, 3))
    first = np.clip(base, 0, 255).astype(np.uint8)
    return first, _noisy(first, sigma=20, seed=3)


def test_lpips_identity_positivity_symmetry(lpips_files, image_pair):
    a, b = image_pair
    assert calculate_lpips(a, a.copy(), **lpips_files) == 0.0
    d_ab = calculate_lpips(a, b, **lpips_files)
    d_ba = calculate_lpips(b, a, **lpips_files)
    assert np.isfinite(d_ab) and d_ab > 0
    assert d_ab == pytest.approx(d_ba, rel=1e-6)
    assert calculate_lpips(a, b, crop_border=4, **lpips_files) != pytest.approx(d_ab, rel=1e-6)


def test_lpips_through_registry_and_cache(lpips_files, image_pair):
    a, b = image_pair
    opt = {'type': 'calculate_lpips', 'crop_border': 0, 'better': 'lower', **lpips_files}
    assert calculate_metric({'img': a, 'img2': b}, opt) == pytest.approx(calculate_lpips(a, b, **lpips_files))
    net = load_lpips_alex(lpips_files['backbone_weights'], lpips_files['lpips_weights'], 'cpu')
    assert load_lpips_alex(lpips_files['backbone_weights'], lpips_files['lpips_weights'], 'cpu') is net


def test_lpips_missing_weights_name_the_option(lpips_files, image_pair, tmp_path):
    a, b = image_pair
    with pytest.raises(FileNotFoundError, match='lpips_weights'):
        calculate_lpips(a, b, backbone_weights=lpips_files['backbone_weights'])
    with pytest.raises(FileNotFoundError, match='backbone_weights'):
        calculate_lpips(a, b, lpips_weights=lpips_files['lpips_weights'])
    with pytest.raises(FileNotFoundError, match='lpips_weights.*does not exist'):
        calculate_lpips(a, b, backbone_weights=lpips_files['backbone_weights'],
                        lpips_weights=str(tmp_path / 'absent.pth'))
    wrong = tmp_path / 'wrong.pth'
    torch.save({'lin0.weight': torch.ones(1, 64, 1, 1)}, wrong)
    with pytest.raises(ValueError, match='lpips_weights'):
        calculate_lpips(a, b, backbone_weights=lpips_files['backbone_weights'], lpips_weights=str(wrong))


def test_lpips_loads_a_full_torchvision_alexnet_state_dict(lpips_files, tmp_path):
    import torchvision

    state = torchvision.models.alexnet(weights=None).state_dict()  # with classifier.*, as torchvision ships it
    path = tmp_path / 'alexnet_full.pth'
    torch.save(state, path)
    net = load_lpips_alex(path, lpips_files['lpips_weights'], 'cpu')
    for stage, (start, _) in zip(net.stages, LPIPSAlex.STAGE_BOUNDS):
        for offset, layer in enumerate(stage):
            if isinstance(layer, torch.nn.Conv2d):
                assert torch.equal(layer.weight, state[f'features.{start + offset}.weight'])
                assert torch.equal(layer.bias, state[f'features.{start + offset}.bias'])
    lins = torch.load(lpips_files['lpips_weights'], weights_only=True)
    for i, lin in enumerate(net.lins):
        assert lin.weight.shape == (1, LPIPSAlex.CHANNELS[i], 1, 1)
        assert torch.equal(lin.weight, lins[f'lin{i}.model.1.weight'])

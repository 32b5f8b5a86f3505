"""`baryir infer`: any size, bit depth, grey/alpha, EXIF orientation, exact tiles, folders with bad files,
and weights files of every kind (and of no kind)."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from baryir_plugin.cli import main
from baryir_plugin.errors import DataError
from baryir_plugin.inference.images import read_picture
from baryir_plugin.inference.infer import Restorer
from baryir_plugin.inference.tiling import StreamedRunner, blended_forward, streamed_forward
from baryir_plugin.inference.weights import load_network

from .bad_input import assert_clean_error, run_inprocess
from .conftest import shared_path

PROG = 'baryir infer'


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth colour image with edges (float RGB in [0, 1]), deterministic."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([0.5 + 0.4 * np.sin(6 * xx + 3 * yy), 0.5 + 0.4 * np.cos(5 * yy), (xx > 0.5) * 0.6 + 0.2], -1)
    return np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1).astype(np.float32)


def _net_output(checkpoint: Path, rgb: np.ndarray) -> np.ndarray:
    """The network's restoration of an RGB float image, computed directly."""
    net = load_network(str(checkpoint), log=lambda _: None).net
    with torch.no_grad():
        y = net(torch.from_numpy(rgb).permute(2, 0, 1)[None]).clamp(0, 1)
    return y[0].permute(1, 2, 0).numpy()


def _infer(args, cwd=None):
    return run_inprocess(main, ['infer', '--quiet', *map(str, args)], cwd=cwd)


def _ok(outcome):
    assert outcome.status == 0, outcome.text
    return outcome


# --------------------------------------------------------------------------------------------------
def test_odd_size_folder_restored_like_the_network(tmp_path, demo_checkpoint):
    src = tmp_path / 'in'
    src.mkdir()
    images = {'odd.png': _photo(37, 53), 'wide.png': _photo(20, 91, 1)}
    for name, rgb in images.items():
        cv2.imwrite(str(src / name), np.round(rgb[..., ::-1] * 255).astype(np.uint8))
    outcome = _ok(_infer(['-i', src, '-o', tmp_path / 'out', '--weights', demo_checkpoint]))
    assert 'restored 2, skipped 0, failed 0' in outcome.out and 's per megapixel' in outcome.out
    for name in images:
        out = cv2.imread(str(tmp_path / 'out' / name), cv2.IMREAD_UNCHANGED)
        rgb = cv2.imread(str(src / name))[..., ::-1].astype(np.float32) / 255
        assert out.shape == rgb.shape and out.dtype == np.uint8
        expected = np.round(_net_output(demo_checkpoint, rgb) * 255)
        assert np.abs(out[..., ::-1].astype(np.float32) - expected).max() <= 1  # rounding of the last level
        assert np.abs(out[..., ::-1].astype(np.float32) - rgb * 255).mean() > 2  # it did restore something


def test_dark_16_bit_image_stays_16_bit(tmp_path, demo_checkpoint):
    """Every sample below 256: Real-ESRGAN's rule (max > 256) would read it as 8-bit; the dtype decides here."""
    rgb = _photo(29, 35) * (200 / 65535)
    path = tmp_path / 'dark16.png'
    cv2.imwrite(str(path), np.round(rgb[..., ::-1] * 65535).astype(np.uint16))
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).max() < 256
    _ok(_infer(['-i', path, '-o', tmp_path / 'out', '--weights', demo_checkpoint]))
    out = cv2.imread(str(tmp_path / 'out' / 'dark16.png'), cv2.IMREAD_UNCHANGED)
    assert out.dtype == np.uint16 and out.shape == (29, 35, 3)
    src = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[..., ::-1].astype(np.float32) / 65535
    expected = np.round(_net_output(demo_checkpoint, src) * 65535)
    assert np.abs(out[..., ::-1].astype(np.float64) - expected).max() <= 2


def test_rgba_alpha_passes_through_unchanged(tmp_path, demo_checkpoint):
    rng = np.random.default_rng(3)
    bgr = np.round(_photo(24, 40)[..., ::-1] * 255).astype(np.uint8)
    alpha = rng.integers(0, 256, (24, 40), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / 'rgba.png'), np.dstack([bgr, alpha]))
    _ok(_infer(['-i', tmp_path / 'rgba.png', '-o', tmp_path / 'out', '--weights', demo_checkpoint]))
    out = cv2.imread(str(tmp_path / 'out' / 'rgba.png'), cv2.IMREAD_UNCHANGED)
    assert out.shape == (24, 40, 4)
    np.testing.assert_array_equal(out[..., 3], alpha)
    assert not np.array_equal(out[..., :3], bgr)


def test_grey_in_grey_out(tmp_path, demo_checkpoint):
    grey = np.round(_photo(31, 33)[..., 0] * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / 'grey.png'), grey)
    _ok(_infer(['-i', tmp_path / 'grey.png', '-o', tmp_path / 'out', '--weights', demo_checkpoint]))
    out = cv2.imread(str(tmp_path / 'out' / 'grey.png'), cv2.IMREAD_UNCHANGED)
    assert out.ndim == 2 and out.shape == grey.shape
    three = np.repeat(grey[..., None].astype(np.float32) / 255, 3, axis=2)
    expected = cv2.cvtColor(_net_output(demo_checkpoint, three), cv2.COLOR_RGB2GRAY) * 255
    assert np.abs(out - expected).max() <= 1


def test_grey_with_alpha_stays_grey_with_the_same_alpha(tmp_path, demo_checkpoint):
    from PIL import Image

    rng = np.random.default_rng(5)
    grey = np.round(_photo(22, 30)[..., 1] * 255).astype(np.uint8)
    alpha = rng.integers(0, 256, grey.shape, dtype=np.uint8)
    Image.fromarray(np.dstack([grey, alpha]), 'LA').save(tmp_path / 'la.png')
    _ok(_infer(['-i', tmp_path / 'la.png', '-o', tmp_path / 'out', '--weights', demo_checkpoint]))
    with Image.open(tmp_path / 'out' / 'la.png') as im:
        assert im.mode == 'LA'
        out = np.asarray(im)
    np.testing.assert_array_equal(out[..., 1], alpha)
    assert not np.array_equal(out[..., 0], grey)


def test_exif_orientation_is_applied_and_said(tmp_path, demo_checkpoint):
    from PIL import Image

    rgb = np.round(_photo(24, 40) * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    Image.fromarray(rgb).save(tmp_path / 'side.jpg', exif=exif, quality=98)
    picture = read_picture(str(tmp_path / 'side.jpg'))
    assert picture.rgb.shape == (40, 24, 3)
    assert any('EXIF orientation 6' in note for note in picture.notes)
    outcome = _ok(_infer(['-i', tmp_path / 'side.jpg', '-o', tmp_path / 'out', '--weights', demo_checkpoint]))
    assert 'EXIF orientation 6 applied' in outcome.err
    assert cv2.imread(str(tmp_path / 'out' / 'side.jpg')).shape == (40, 24, 3)


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('tile', [16, 24, 40])
def test_tiled_equals_untiled(demo_checkpoint, tile):
    """Exact tiles: every layer streamed, MDTA's statistics summed over all tiles (< 1e-3 required; ~1e-6)."""
    net = load_network(str(demo_checkpoint), log=lambda _: None).net
    x = torch.from_numpy(_photo(77, 101)).permute(2, 0, 1)[None]
    with torch.no_grad():
        whole = net(x)
    tiled = streamed_forward(net, x, StreamedRunner(tile, torch.device('cpu')))
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().max().item() < 1e-4


def test_independent_tiles_are_not_exact_for_channel_attention(demo_checkpoint):
    """Why the exact path exists: blended independent tiles see other attention statistics than the whole."""
    net = load_network(str(demo_checkpoint), log=lambda _: None).net
    x = torch.from_numpy(_photo(96, 128)).permute(2, 0, 1)[None]
    with torch.no_grad():
        whole = net(x)
        blended = blended_forward(net, x, tile=48, overlap=16)
    assert (blended - whole).abs().max().item() > 1e-3


def test_tiles_through_the_command_equal_the_whole_image(tmp_path, demo_checkpoint):
    rgb = _photo(45, 70)
    cv2.imwrite(str(tmp_path / 'a.png'), np.round(rgb[..., ::-1] * 65535).astype(np.uint16))
    _ok(_infer(['-i', tmp_path / 'a.png', '-o', tmp_path / 'whole', '--weights', demo_checkpoint, '--tile', '0']))
    out = _ok(_infer(['-i', tmp_path / 'a.png', '-o', tmp_path / 'tiled', '--weights', demo_checkpoint,
                      '--tile', '16']))
    assert '16-pixel tiles' in out.err
    whole = cv2.imread(str(tmp_path / 'whole' / 'a.png'), cv2.IMREAD_UNCHANGED).astype(np.float64) / 65535
    tiled = cv2.imread(str(tmp_path / 'tiled' / 'a.png'), cv2.IMREAD_UNCHANGED).astype(np.float64) / 65535
    assert np.abs(whole - tiled).max() < 1e-3


def test_auto_tiles_when_the_budget_is_small(demo_checkpoint):
    loaded = load_network(str(demo_checkpoint), log=lambda _: None)
    said = []
    rgb = _photo(160, 200)
    probe = Restorer(loaded.net, loaded.options, torch.device('cpu'))
    whole, tiled = probe._planned((1, 3, 160, 200), None), probe._planned((1, 3, 160, 200), 64)
    assert tiled < whole
    restorer = Restorer(loaded.net, loaded.options, torch.device('cpu'), max_memory=(whole + tiled) // 2,
                        log=said.append)
    out = restorer.restore(rgb, 'big.png')
    assert restorer.last_plan.endswith('-pixel tiles'), restorer.last_plan
    assert said and 'big.png' in said[0] and 'budget' in said[0]
    assert np.abs(out - _net_output(demo_checkpoint, rgb)).max() < 1e-4
    roomy = Restorer(loaded.net, loaded.options, torch.device('cpu'), max_memory=8 * 2 ** 30, log=said.append)
    roomy.restore(rgb, 'big.png')
    assert roomy.last_plan == 'whole'


def test_out_of_memory_is_retried_in_smaller_tiles(demo_checkpoint, monkeypatch):
    """A GPU's OutOfMemoryError (or the CPU allocator's error) on the whole image: retried in tiles, said."""
    loaded = load_network(str(demo_checkpoint), log=lambda _: None)
    said = []

    def no_memory(self, x):
        raise RuntimeError('DefaultCPUAllocator: not enough memory: you tried to allocate 9 GB')

    monkeypatch.setattr(Restorer, '_whole', no_memory)
    restorer = Restorer(loaded.net, loaded.options, torch.device('cpu'), log=said.append)
    rgb = _photo(150, 200)
    out = restorer.restore(rgb, 'big.png')
    assert restorer.last_plan == '128-pixel tiles'
    assert said == ['big.png: out of CPU memory whole; retrying in 128-pixel tiles.']
    assert np.abs(out - _net_output(demo_checkpoint, rgb)).max() < 1e-4
    monkeypatch.setattr(Restorer, '_tiled', lambda self, x, tile: no_memory(self, x))
    with pytest.raises(DataError, match='big.png: out of CPU memory in 64-pixel tiles'):
        restorer.restore(rgb, 'big.png')


def test_self_ensemble_and_bf16(tmp_path, demo_checkpoint):
    loaded = load_network(str(demo_checkpoint), log=lambda _: None)
    rgb = _photo(33, 41)
    plain = Restorer(loaded.net, loaded.options, torch.device('cpu'), tile=0).restore(rgb)
    ensemble = Restorer(loaded.net, loaded.options, torch.device('cpu'), tile=0, self_ensemble=True).restore(rgb)
    flipped = Restorer(loaded.net, loaded.options, torch.device('cpu'), tile=0,
                       self_ensemble=True).restore(np.ascontiguousarray(rgb[:, ::-1]))
    assert np.abs(ensemble - plain).max() > 1e-3
    np.testing.assert_allclose(flipped[:, ::-1], ensemble, atol=1e-5)  # the mean over all 8 views is symmetric
    bf16 = Restorer(loaded.net, loaded.options, torch.device('cpu'), tile=24, precision='bf16').restore(rgb)
    assert np.abs(bf16 - plain).mean() < 0.02


# --------------------------------------------------------------------------------------------------
def test_a_corrupt_file_in_a_folder_is_listed_and_the_rest_restored(tmp_path, demo_checkpoint):
    src = tmp_path / 'in'
    src.mkdir()
    for name in ('a.png', 'c.png'):
        cv2.imwrite(str(src / name), np.round(_photo(20, 24)[..., ::-1] * 255).astype(np.uint8))
    good = (src / 'a.png').read_bytes()
    (src / 'b.png').write_bytes(good[:len(good) // 2])  # truncated
    (src / 'notes.txt').write_text('not an image, not listed')
    outcome = _infer(['-i', src, '-o', tmp_path / 'out', '--weights', demo_checkpoint])
    assert outcome.status == 1
    assert sorted(os.listdir(tmp_path / 'out')) == ['a.png', 'c.png']
    assert 'restored 2, skipped 0, failed 1' in outcome.out
    assert 'b.png' in outcome.err and 'Traceback' not in outcome.text


def test_existing_outputs_are_kept_without_overwrite(tmp_path, demo_checkpoint):
    cv2.imwrite(str(tmp_path / 'a.png'), np.round(_photo(20, 24)[..., ::-1] * 255).astype(np.uint8))
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'a.png').write_bytes(b'keep me')
    outcome = _ok(_infer(['-i', tmp_path / 'a.png', '-o', tmp_path / 'out', '--weights', demo_checkpoint]))
    assert 'skipped 1' in outcome.out and (tmp_path / 'out' / 'a.png').read_bytes() == b'keep me'
    _ok(_infer(['-i', tmp_path / 'a.png', '-o', tmp_path / 'out', '--weights', demo_checkpoint, '--overwrite']))
    assert cv2.imread(str(tmp_path / 'out' / 'a.png')) is not None


def test_output_onto_the_input_is_refused(tmp_path, demo_checkpoint):
    cv2.imwrite(str(tmp_path / 'a.png'), np.round(_photo(20, 24)[..., ::-1] * 255).astype(np.uint8))
    before = (tmp_path / 'a.png').read_bytes()
    outcome = _infer(['-i', tmp_path, '-o', tmp_path, '--weights', demo_checkpoint, '--overwrite'])
    assert_clean_error(outcome, PROG, 'a.png', '--suffix', status=2)
    assert (tmp_path / 'a.png').read_bytes() == before
    _ok(_infer(['-i', tmp_path, '-o', tmp_path, '--weights', demo_checkpoint, '--suffix', '_restored']))
    assert (tmp_path / 'a_restored.png').is_file()


def test_16_bit_or_alpha_to_jpeg_is_refused_per_file(tmp_path, demo_checkpoint):
    cv2.imwrite(str(tmp_path / 'a.png'), np.round(_photo(20, 24)[..., ::-1] * 65535).astype(np.uint16))
    outcome = _infer(['-i', tmp_path / 'a.png', '-o', tmp_path / 'out', '--weights', demo_checkpoint, '--ext', 'jpg'])
    assert outcome.status == 1 and '16-bit' in outcome.err and '--ext png' in outcome.err
    rgba = np.dstack([np.round(_photo(20, 24)[..., ::-1] * 255).astype(np.uint8), np.full((20, 24), 128, np.uint8)])
    cv2.imwrite(str(tmp_path / 'b.png'), rgba)
    outcome = _infer(['-i', tmp_path / 'b.png', '-o', tmp_path / 'out', '--weights', demo_checkpoint, '--ext', 'jpg'])
    assert outcome.status == 1 and 'alpha channel' in outcome.err and 'Traceback' not in outcome.text


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def _weights_cases(tmp_path: Path, demo_checkpoint: Path) -> dict:
    random_bytes = tmp_path / 'random.pth'
    random_bytes.write_bytes(os.urandom(4096))
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(demo_checkpoint.read_bytes()[:5000])
    state = tmp_path / '10.state'
    torch.save({'iter': 10, 'epoch': 1, 'optimizers': [], 'schedulers': []}, state)
    potentials = tmp_path / 'net_potential_10.pth'
    torch.save({'params': {'conv_weight': torch.zeros(2, 4, 1, 3, 3)},
                'baryir_config': {'type': 'BarycenterPotentials', 'num_potentials': 2}}, potentials)
    bare_potentials = tmp_path / 'net_potential_old.pth'  # written before the options were saved with it
    torch.save({'params': {'conv_weight': torch.zeros(2, 4, 1, 3, 3), 'fc1_weight': torch.zeros(2, 8, 4),
                           'fc3_weight': torch.zeros(2, 8)}}, bare_potentials)
    malicious = tmp_path / 'malicious.pth'
    with open(malicious, 'wb') as f:
        pickle.dump({'params': _Payload(tmp_path / 'pwned')}, f)
    torch.save({'params': _Payload(tmp_path / 'pwned')}, tmp_path / 'malicious_zip.pth')
    other = tmp_path / 'other.pth'
    weights = torch.load(demo_checkpoint, weights_only=True)
    weights['baryir_config'] = {**weights['baryir_config'], 'dim': 16}
    torch.save(weights, other)
    return {random_bytes: 'not a torch checkpoint', truncated: 'truncated', state: 'training state',
            potentials: 'potentials', bare_potentials: 'potentials', malicious: 'not a torch checkpoint',
            tmp_path / 'malicious_zip.pth': 'refusing to load', other: 'does not fit',
            tmp_path / 'missing.pth': 'no such file'}


def test_wrong_or_malicious_weights_are_one_line_and_run_nothing(tmp_path, demo_checkpoint):
    cv2.imwrite(str(tmp_path / 'a.png'), np.round(_photo(20, 24)[..., ::-1] * 255).astype(np.uint8))
    for path, needle in _weights_cases(tmp_path, demo_checkpoint).items():
        outcome = _infer(['-i', tmp_path / 'a.png', '-o', tmp_path / 'out', '--weights', path])
        assert_clean_error(outcome, PROG, path.name, needle)
    assert not (tmp_path / 'pwned').exists(), 'the pickled payload ran'
    assert not (tmp_path / 'out').exists() or not os.listdir(tmp_path / 'out')


@pytest.mark.parametrize('argv, needle', [
    (['--tile', '8'], 'at least 16'),
    (['--device', 'cuda:7'], '--device'),
    (['--suffix', 'a/b'], '--suffix'),
    (['--max-memory', '0'], 'greater than 0'),
    (['--jpeg-quality', '0'], '--jpeg-quality'),
])
def test_bad_flags(tmp_path, demo_checkpoint, argv, needle):
    cv2.imwrite(str(tmp_path / 'a.png'), np.round(_photo(20, 24)[..., ::-1] * 255).astype(np.uint8))
    outcome = _infer(['-i', tmp_path / 'a.png', '-o', tmp_path / 'out', '--weights', demo_checkpoint, *argv])
    assert_clean_error(outcome, PROG, needle, status=2)


def test_missing_input_and_empty_folder(tmp_path, demo_checkpoint):
    outcome = _infer(['-i', tmp_path / 'nope', '-o', tmp_path / 'out', '--weights', demo_checkpoint])
    assert_clean_error(outcome, PROG, 'nope', 'no such file')
    (tmp_path / 'empty').mkdir()
    outcome = _infer(['-i', tmp_path / 'empty', '-o', tmp_path / 'out', '--weights', demo_checkpoint])
    assert_clean_error(outcome, PROG, 'empty', 'no images')


def test_release_file_and_safetensors_restore_like_the_converted_file(tmp_path):
    release = shared_path('fixtures', 'reference_small', 'official_format_checkpoint.pt')
    cv2.imwrite(str(tmp_path / 'a.png'), np.round(_photo(26, 30)[..., ::-1] * 255).astype(np.uint8))
    assert main(['convert-official', str(release), str(tmp_path / 'converted.pth')]) == 0
    assert main(['export-safetensors', '--weights', str(tmp_path / 'converted.pth'), '-o',
                 str(tmp_path / 'converted.safetensors')]) == 0
    outputs = {}
    for name, weights in (('release', release), ('converted', tmp_path / 'converted.pth'),
                          ('safetensors', tmp_path / 'converted.safetensors')):
        outcome = _ok(_infer(['-i', tmp_path / 'a.png', '-o', tmp_path / name, '--weights', weights]))
        assert 'options from the weights file' in outcome.err
        outputs[name] = cv2.imread(str(tmp_path / name / 'a.png'), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(outputs['release'], outputs['converted'])
    np.testing.assert_array_equal(outputs['safetensors'], outputs['converted'])


def test_training_writes_the_network_options_beside_the_weights(tmp_path):
    """BaryIRModel's saves carry network_g's options, so infer needs no option file."""
    from basicsr.models import build_model

    from .conftest import DEMO_NETWORK

    opt = {'name': 't', 'model_type': 'SRModel', 'num_gpu': 0, 'is_train': False, 'dist': False, 'scale': 1,
           'network_g': dict(DEMO_NETWORK), 'path': {'models': str(tmp_path), 'pretrain_network_g': None},
           'val': {}}
    model = build_model(opt)
    model.save_network(model.net_g, 'net_g', 7)
    saved = torch.load(tmp_path / 'net_g_7.pth', weights_only=True)
    assert saved['baryir_config'] == DEMO_NETWORK
    loaded = load_network(str(tmp_path / 'net_g_7.pth'), log=lambda _: None)
    assert loaded.options_from == 'the weights file'


def test_the_memory_plan_covers_what_a_restoration_takes(demo_checkpoint):
    """--tile auto trusts the planned peak on the CPU: it must not be below the resident memory measured."""
    from baryir_plugin.inference.memory import measure_peak_increase

    loaded = load_network(str(demo_checkpoint), log=lambda _: None)
    restorer = Restorer(loaded.net, loaded.options, torch.device('cpu'))
    x = torch.rand(1, 3, 320, 320)
    for tile in (None, 64):
        planned = restorer._planned(tuple(x.shape), tile)
        if tile is None:
            measured = measure_peak_increase(lambda: restorer._whole(x))
        else:
            measured = measure_peak_increase(lambda: restorer._tiled(x, tile))
        if measured is None:
            pytest.skip('this kernel offers no resident-set high-water mark to measure against')
        assert planned >= measured, (tile, planned, measured)
    assert restorer._planned(tuple(x.shape), 64) < restorer._planned(tuple(x.shape), None)

"""``baryir figures grid|tsne|ablation`` on the demo network and the tiny validation sets: each writes a PNG
that loads, and a bad input is one line."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from baryir_plugin import cli
from baryir_plugin.analysis import figures

from .bad_input import assert_clean_error, run_inprocess

PROG = 'baryir figures'


def _run(argv, cwd):
    return run_inprocess(cli.main, ['figures', *map(str, argv)], cwd=cwd)


def _png(path, min_side=300):
    img = cv2.imread(str(path))
    assert img is not None, f'{path} does not load as an image'
    assert min(img.shape[:2]) >= min_side and max(img.shape[:2]) < 5000, img.shape
    return img


def test_grid_rows_psnr_and_png(tmp_path, demo_checkpoint, tiny_dataset):
    val = tiny_dataset / 'val' / 'rain'
    out = tmp_path / 'grid.png'
    outcome = _run(['grid', '--weights', demo_checkpoint, '-i', val / 'lq', '--gt', val / 'gt', '-o', out], tmp_path)
    assert outcome.status == 0, outcome.text
    assert outcome.out.count('PSNR degraded') == 2 and f'wrote {out}' in outcome.out
    _png(out)
    # a single file, no GT, one image at most: a row without PSNR
    one = tmp_path / 'one.png'
    lq = sorted((val / 'lq').iterdir())[0]
    outcome = _run(['grid', '--weights', demo_checkpoint, '-i', lq, '-o', one, '--max-images', '1'], tmp_path)
    assert outcome.status == 0 and 'no target' in outcome.out, outcome.text
    _png(one, min_side=150)


def test_tsne_two_panels_and_silhouettes(tmp_path, demo_checkpoint, tiny_dataset):
    out = tmp_path / 'tsne.png'
    outcome = _run(['tsne', '--weights', demo_checkpoint, '--data', tiny_dataset / 'val', '-o', out, '--seed', '1'],
                   tmp_path)
    assert outcome.status == 0, outcome.text
    lines = [ln for ln in outcome.out.splitlines() if ln.startswith('silhouette by degradation')]
    assert len(lines) == 2 and 'barycenter' in lines[0] and 'residual' in lines[1], outcome.out
    img = _png(out)
    assert img.shape[1] > img.shape[0]  # two panels side by side
    # two sets, one latent cell per point
    out2 = tmp_path / 'tsne2.png'
    outcome = _run(['tsne', '--weights', demo_checkpoint, '--data', tiny_dataset / 'val', '--sets', 'noise', 'haze',
                    '--patch', '8', '--perplexity', '5', '-o', out2], tmp_path)
    assert outcome.status == 0, outcome.text
    _png(out2)


def test_ablation_with_and_without_target(tmp_path, demo_checkpoint, tiny_dataset):
    val = tiny_dataset / 'val' / 'lowlight'
    lq = sorted((val / 'lq').iterdir())[0]
    out = tmp_path / 'ablation.png'
    outcome = _run(['ablation', '--weights', demo_checkpoint, '-i', lq, '--gt', val / 'gt' / lq.name, '-o', out],
                   tmp_path)
    assert outcome.status == 0, outcome.text
    assert 'mean |R1 - R3|' in outcome.out and 'R2 residual zeroed' in outcome.out
    _png(out)
    outcome = _run(['ablation', '--weights', demo_checkpoint, '-i', lq, '-o', tmp_path / 'plain.png'], tmp_path)
    assert outcome.status == 0 and 'PSNR' not in outcome.out, outcome.text
    _png(tmp_path / 'plain.png')


def test_ablation_zeroes_each_feature_and_restores_the_setting(demo_checkpoint, tiny_dataset):
    from baryir_plugin.inference.weights import load_network

    net = load_network(str(demo_checkpoint), log=lambda line: None).net
    img = figures.read_rgb(str(sorted((tiny_dataset / 'val' / 'noise' / 'lq').iterdir())[0]))
    full, no_bary, no_residual = figures.ablate(net, img, 'ckpt')
    assert full.shape == no_bary.shape == no_residual.shape == img.shape
    assert not np.allclose(full, no_bary) and not np.allclose(full, no_residual)
    assert net.zero_features is None
    np.testing.assert_allclose(figures.restore(net, img), full)


def test_read_rgb_8_and_16_bit_grey_and_alpha(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / 'a8.png'), rgb[:, :, ::-1])
    cv2.imwrite(str(tmp_path / 'a16.png'), rgb[:, :, ::-1].astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / 'grey.png'), rgb[:, :, 0])
    cv2.imwrite(str(tmp_path / 'alpha.png'), np.dstack([rgb[:, :, ::-1], np.full((5, 7), 9, np.uint8)]))
    expected = rgb.astype(np.float32) / 255
    for name in ('a8.png', 'a16.png', 'alpha.png'):
        np.testing.assert_allclose(figures.read_rgb(str(tmp_path / name)), expected, atol=1e-6)
    grey = figures.read_rgb(str(tmp_path / 'grey.png'))
    assert grey.shape == (5, 7, 3) and np.allclose(grey[..., 1], rgb[:, :, 0] / 255)


def test_window_means_leave_out_padding():
    import torch

    latent = torch.arange(2 * 5 * 6, dtype=torch.float32).reshape(2, 5, 6)
    # a 29 x 51 image: latent 4 x 7 padded, 3 x 6 cells inside the image; 2x2 windows -> 1 x 3 points
    points = figures.window_means(latent[:, :4, :], 29, 51, 2)
    assert points.shape == (3, 2)
    np.testing.assert_allclose(points[0], latent[:, :2, :2].mean(dim=(1, 2)).numpy())
    # an image smaller than one window: one point
    assert figures.window_means(latent, 12, 12, 4).shape == (1, 2)


# --------------------------------------------------------------------------------------------------
# bad inputs
def test_missing_and_empty_folders(tmp_path, demo_checkpoint, tiny_dataset):
    empty = tmp_path / 'empty'
    empty.mkdir()
    (empty / 'notes.txt').write_text('no images here')
    ckpt = ['--weights', demo_checkpoint]
    cases = [
        (['grid', *ckpt, '-i', 'nope', '-o', 'g.png'], ['-i nope', 'no such file'], 2),
        (['grid', *ckpt, '-i', empty, '-o', 'g.png'], [str(empty), 'holds no images'], 1),
        (['grid', *ckpt, '-i', tiny_dataset / 'val' / 'rain' / 'lq', '--gt', 'nogt', '-o', 'g.png'], ['--gt nogt'], 2),
        (['tsne', *ckpt, '--data', 'nope', '-o', 't.png'], ['--data nope', 'no such folder'], 2),
        (['tsne', *ckpt, '--data', empty, '-o', 't.png'], [str(empty), 'no <set>/lq folders'], 1),
        (['tsne', *ckpt, '--data', tiny_dataset / 'val', '--sets', 'noise', 'rian', '-o', 't.png'],
         ['--sets rian', "did you mean 'rain'"], 2),
        (['tsne', *ckpt, '--data', tiny_dataset / 'val', '--sets', 'noise', '-o', 't.png'], ['at least two sets'], 2),
        (['tsne', *ckpt, '--data', tiny_dataset / 'val', '--patch', '12', '-o', 't.png'],
         ['--patch 12', 'multiple of 8'], 2),
        (['ablation', *ckpt, '-i', 'nope.png', '-o', 'a.png'], ['-i nope.png', 'no such file'], 2),
        (['ablation', *ckpt, '-i', tiny_dataset / 'val' / 'rain' / 'lq', '-o', 'a.png'], ['not an image file'], 2),
        (['ablation', '--weights', 'missing.pth', '-i', sorted((tiny_dataset / 'val' / 'rain' / 'lq').iterdir())[0],
          '-o', 'a.png'], ['missing.pth', 'no such file'], 1),
    ]
    for argv, needles, status in cases:
        assert_clean_error(_run(argv, tmp_path), PROG, *needles, status=status)
    assert not list(tmp_path.glob('*.png'))


def test_unreadable_image_is_named(tmp_path, demo_checkpoint):
    folder = tmp_path / 'lq'
    folder.mkdir()
    (folder / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\x00' * 40)
    outcome = _run(['grid', '--weights', demo_checkpoint, '-i', folder, '-o', 'g.png'], tmp_path)
    assert_clean_error(outcome, PROG, 'broken.png')


def test_existing_output_needs_overwrite(tmp_path, demo_checkpoint, tiny_dataset):
    lq = sorted((tiny_dataset / 'val' / 'haze' / 'lq').iterdir())[0]
    out = tmp_path / 'a.png'
    out.write_bytes(b'keep me')
    argv = ['ablation', '--weights', demo_checkpoint, '-i', lq, '-o', out]
    assert_clean_error(_run(argv, tmp_path), PROG, str(out), '--overwrite', status=2)
    assert out.read_bytes() == b'keep me'
    for command in (['grid', '-i', lq], ['tsne', '--data', tiny_dataset / 'val']):
        outcome = _run([*command, '--weights', demo_checkpoint, '-o', out], tmp_path)
        assert_clean_error(outcome, PROG, '--overwrite', status=2)
    assert_clean_error(_run(['grid', '--weights', demo_checkpoint, '-i', lq, '-o', tmp_path / 'g.jpg'], tmp_path),
                       PROG, 'g.jpg', '.png', status=2)
    outcome = _run([*argv, '--overwrite'], tmp_path)
    assert outcome.status == 0, outcome.text
    _png(out)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith('.tmp')]


def test_figures_without_a_figure_prints_help(tmp_path):
    outcome = _run([], tmp_path)
    assert outcome.status == 2 and 'grid' in outcome.out and 'ablation' in outcome.out
    outcome = run_inprocess(cli.main, ['figures', 'grid', '-i', 'x'], cwd=tmp_path)
    assert outcome.status == 2 and 'Traceback' not in outcome.text and '--weights' in outcome.text


@pytest.mark.parametrize('value', ['0', '-3', 'x'])
def test_bad_numbers_are_usage_errors(tmp_path, value, demo_checkpoint):
    outcome = run_inprocess(cli.main, ['figures', 'tsne', '--weights', str(demo_checkpoint), '--data', '.',
                                       '-o', 't.png', '--perplexity', value], cwd=tmp_path)
    assert outcome.status == 2 and 'Traceback' not in outcome.text and '--perplexity' in outcome.text

"""``baryir figures grid|tsne|ablation``: the figures that show what a trained BaryIR does, one PNG each.

- ``grid``: one row per image -- degraded, restored, target (when a GT of the same name exists), with
  the PSNR of the degraded and the restored image against the target (RGB, BasicSR's
  ``calculate_psnr``, crop border 0, on 8-bit values as BasicSR's validation computes it).
- ``tsne``: the latent-space picture of the BaryIR journal ("Learning Continuous Wasserstein Barycenter
  Space for Generalized All-in-One Image Restoration", Fig. 3): t-SNE of the barycenter embeddings
  z_B and of the residual embeddings z - z_B, coloured by degradation. A validation set holds few
  images, so every image gives several points: its latent averaged over non-overlapping windows of
  ``--patch`` pixels. The silhouette score by degradation, per panel, is the number behind the picture:
  near zero or below where degradations mix (the claim for z_B), higher where they cluster (the claim
  for the residuals).
- ``ablation``: the test-time feature ablation of the same paper (Fig. 9): the full restoration R3,
  R1 with the barycenter features zeroed, R2 with the residual features zeroed, and the difference maps
  |R1 - R3| and |R2 - R3| on one colour scale.

matplotlib and scikit-learn are imported only when a figure is made (every ``baryir`` call imports
this module); drawing uses matplotlib's Agg canvas through ``Figure`` objects, never pyplot, so no
screen is needed.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..errors import DataError, SetupError, UsageError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')
# the journal's five degradations first, in its order; other set names follow alphabetically
KNOWN_SETS = ('noise', 'rain', 'haze', 'blur', 'lowlight')
LATENT_STRIDE = 8  # the latent is at 1/8 of the (padded) input
DPI = 150
CELL_INCHES = 2.6  # width of one image in the grid and ablation figures


# --------------------------------------------------------------------------------------------------
# inputs and outputs
def _matplotlib_figure():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise SetupError('baryir figures draws with matplotlib, which is not installed: pip install matplotlib') \
            from None
    return Figure


def _sklearn():
    try:
        from sklearn.manifold import TSNE
        from sklearn.metrics import silhouette_score
    except ImportError:
        raise SetupError('baryir figures tsne needs scikit-learn, which is not installed: pip install scikit-learn') \
            from None
    return TSNE, silhouette_score


def _cwd_note() -> str:
    return f'relative paths are relative to {os.getcwd()}'


def check_output(path: str, overwrite: bool, flag: str = '-o') -> None:
    """Refuse an output that is not a .png, is a folder, or exists (without ``--overwrite``) -- before any work."""
    if not path.lower().endswith('.png'):
        raise UsageError(f'{flag} {path}: the figure is written as PNG; give a file name ending in .png.')
    if os.path.isdir(path):
        example = os.path.join(path, 'figure.png')
        raise UsageError(f'{flag} {path} is a folder; give a file name inside it, e.g. {example}.')
    if os.path.exists(path) and not overwrite:
        raise UsageError(f'{flag} {path} exists already; pass --overwrite to replace it, or choose another output.')


def save_figure(fig, path: str) -> None:
    """Write ``fig`` as a PNG, atomically: an error leaves the previous file (or none), never half a PNG."""
    from ..compat import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=DPI))


def is_image_file(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: str, flag: str) -> list[str]:
    """The image files of ``folder``, sorted by name; a missing folder or one without images is one line."""
    if not os.path.exists(folder):
        raise UsageError(f'{flag} {folder}: no such folder ({_cwd_note()}).')
    if not os.path.isdir(folder):
        raise UsageError(f'{flag} {folder} is not a folder; give the folder that holds the images.')
    files = sorted(os.path.join(folder, n) for n in os.listdir(folder) if is_image_file(os.path.join(folder, n)))
    if not files:
        raise DataError(f'{flag} {folder} holds no images ({", ".join(IMAGE_EXTENSIONS)}); give a folder of images.')
    return files


def read_rgb(path: str) -> np.ndarray:
    """An image file as RGB float32 in [0, 1], (H, W, 3): 8-bit or 16-bit (told by the decoded dtype); grey
    images are repeated to three channels and an alpha channel is dropped."""
    import cv2

    from ..data.checks import decode

    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DataError(f'{path} cannot be read ({e.strerror or e}); check the file.') from None
    img, problem = decode(buf, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(f'{path} {problem}; replace or remove the file.')
    if img.dtype == np.uint8:
        scale = 255.0
    elif img.dtype == np.uint16:
        scale = 65535.0
    else:
        raise DataError(f'{path} holds {img.dtype} pixels; give an 8-bit or 16-bit image.')
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    if img.shape[2] != 3:
        raise DataError(f'{path} has {img.shape[2]} channels; give a grey, RGB or RGBA image.')
    return np.ascontiguousarray(img[:, :, ::-1], dtype=np.float32) / np.float32(scale)


def psnr(img: np.ndarray, target: np.ndarray) -> float:
    """RGB PSNR in dB of two [0, 1] images: BasicSR's ``calculate_psnr`` (crop border 0) on 8-bit values."""
    from basicsr.metrics.psnr_ssim import calculate_psnr

    return float(calculate_psnr(to_uint8(img), to_uint8(target), crop_border=0))


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def load(args: argparse.Namespace):
    """The network of ``--weights`` (options from the file, ``--opt`` or the weights' shapes), on the GPU when
    there is one."""
    import torch

    from ..inference.weights import load_network

    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    loaded = load_network(args.weights, opt=args.opt, device=device, log=print)
    print(f'network: {loaded.describe()} on {device}')
    return loaded


def _device(net):
    return next(net.parameters()).device


def restore(net, img: np.ndarray) -> np.ndarray:
    """``net`` on one RGB [0, 1] image, clipped to [0, 1]."""
    import torch

    x = torch.from_numpy(img).permute(2, 0, 1)[None].to(_device(net))
    with torch.no_grad():
        out = net(x)
    return out[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else name[:limit - 3] + '...'


def _image_axes(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _show(ax, img: np.ndarray) -> None:
    # small images are enlarged for the page: nearest keeps their pixels honest
    ax.imshow(img, interpolation='nearest' if max(img.shape[:2]) < 256 else 'antialiased')
    _image_axes(ax)


# --------------------------------------------------------------------------------------------------
# grid
@dataclass
class GridRow:
    name: str
    degraded: np.ndarray
    restored: np.ndarray
    target: Optional[np.ndarray]

    @property
    def psnr_degraded(self) -> Optional[float]:
        return None if self.target is None else psnr(self.degraded, self.target)

    @property
    def psnr_restored(self) -> Optional[float]:
        return None if self.target is None else psnr(self.restored, self.target)


def find_targets(lq_files: Sequence[str], gt: Optional[str]) -> list[Optional[str]]:
    """For each LQ file, the GT file of the same name (same stem, any image extension) in ``gt``, or None.
    ``gt`` may also be a single file (for a single LQ image)."""
    if gt is None:
        return [None] * len(lq_files)
    if os.path.isfile(gt):
        if len(lq_files) != 1:
            raise UsageError(f'--gt {gt} is a file but -i gives {len(lq_files)} images; give the GT folder.')
        return [gt]
    by_stem = {os.path.splitext(os.path.basename(p))[0]: p for p in list_images(gt, '--gt')}
    return [by_stem.get(os.path.splitext(os.path.basename(p))[0]) for p in lq_files]


def grid_rows(net, lq_files: Sequence[str], gt_files: Sequence[Optional[str]]) -> list[GridRow]:
    rows = []
    for lq_path, gt_path in zip(lq_files, gt_files):
        lq = read_rgb(lq_path)
        target = read_rgb(gt_path) if gt_path else None
        if target is not None and target.shape != lq.shape:
            raise DataError(f'{gt_path} is {target.shape[1]}x{target.shape[0]} but {lq_path} is '
                            f'{lq.shape[1]}x{lq.shape[0]} (WxH); the target must have the size of its degraded image.')
        rows.append(GridRow(os.path.basename(lq_path), lq, restore(net, lq), target))
    return rows


def grid_figure(rows: Sequence[GridRow], title: str):
    """One row per image: degraded | restored | target (the column only when some image has a target)."""
    Figure = _matplotlib_figure()
    with_target = any(r.target is not None for r in rows)
    cols = 3 if with_target else 2
    heights = [CELL_INCHES * r.degraded.shape[0] / r.degraded.shape[1] for r in rows]
    fig = Figure(figsize=(cols * CELL_INCHES + 0.5, sum(heights) + 0.3 * len(rows) + 0.8), layout='constrained')
    grid = fig.add_gridspec(len(rows), cols, height_ratios=heights)
    for i, row in enumerate(rows):
        p_in, p_out = row.psnr_degraded, row.psnr_restored
        cells = [('Degraded (input)', row.degraded, 'no target' if p_in is None else f'PSNR {p_in:.2f} dB'),
                 ('Restored', row.restored,
                  'no target' if p_out is None else f'PSNR {p_out:.2f} dB ({p_out - p_in:+.2f} dB)')]
        if with_target:
            cells.append(('Target', row.target, '' if row.target is not None else 'no target of this name'))
        for j, (head, img, caption) in enumerate(cells):
            ax = fig.add_subplot(grid[i, j])
            if img is None:
                _image_axes(ax)
                ax.set_facecolor('0.92')
            else:
                _show(ax, img)
            if i == 0:
                ax.set_title(head, fontsize=11, fontweight='bold')
            ax.set_xlabel(caption, fontsize=9)
            if j == 0:
                ax.set_ylabel(f'{_short(row.name)}\n{img.shape[1]}x{img.shape[0]}', fontsize=9)
    note = 'PSNR against the target: RGB, crop border 0 (BasicSR calculate_psnr)' if with_target else \
        'no targets given (--gt): no PSNR'
    fig.suptitle(f'{title}\n{note}', fontsize=10)
    return fig


def run_grid(args: argparse.Namespace) -> int:
    check_output(args.output, args.overwrite)
    if not os.path.exists(args.input):
        raise UsageError(f'-i {args.input}: no such file or folder ({_cwd_note()}).')
    if os.path.isdir(args.input):
        lq_files = list_images(args.input, '-i')
    elif is_image_file(args.input):
        lq_files = [args.input]
    else:
        raise UsageError(f'-i {args.input} is not an image file ({", ".join(IMAGE_EXTENSIONS)}) or a folder of them.')
    if args.gt is not None and not os.path.exists(args.gt):
        raise UsageError(f'--gt {args.gt}: no such file or folder ({_cwd_note()}).')
    if len(lq_files) > args.max_images:
        print(f'-i {args.input}: {len(lq_files)} images; showing the first {args.max_images} by name (--max-images).')
        lq_files = lq_files[:args.max_images]
    gt_files = find_targets(lq_files, args.gt)
    if args.gt is not None and not any(gt_files):
        print(f'--gt {args.gt}: no image of the same name as those of -i; the figure has no targets and no PSNR.')
    loaded = load(args)
    rows = grid_rows(loaded.net, lq_files, gt_files)
    for row in rows:
        if row.target is None:
            print(f'{row.name}: restored (no target)')
        else:
            print(f'{row.name}: PSNR degraded {row.psnr_degraded:.2f} dB, restored {row.psnr_restored:.2f} dB')
    fig = grid_figure(rows, f'BaryIR restorations: {os.path.basename(args.weights)}')
    save_figure(fig, args.output)
    print(f'wrote {args.output}')
    return 0


# --------------------------------------------------------------------------------------------------
# t-SNE of the barycenter and residual embeddings
@dataclass
class Embeddings:
    bary: np.ndarray  # (N, C) barycenter embeddings z_B
    residual: np.ndarray  # (N, C) residual embeddings z - z_B
    sets: list[str]  # degradation of each point
    images: list[str]  # image name of each point
    image_counts: dict  # set -> number of images read


def window_means(latent, height: int, width: int, window: int) -> np.ndarray:
    """(points, C): the (C, h, w) latent of an H x W image averaged over non-overlapping window x window cells.

    Only cells wholly inside the image count (the right and bottom cells that hold padding are left out);
    an image smaller than one window gives one point, its whole latent averaged.
    """
    import torch.nn.functional as F

    rows, cols = height // LATENT_STRIDE, width // LATENT_STRIDE
    valid = latent[:, :max(rows, 1), :max(cols, 1)]
    if rows < window or cols < window:
        return valid.mean(dim=(1, 2))[None].cpu().numpy()
    pooled = F.avg_pool2d(valid[None], window, stride=window)[0]  # (C, rows // window, cols // window)
    return pooled.flatten(1).T.cpu().numpy()


def collect_embeddings(net, sets: dict, patch: int) -> Embeddings:
    """Run ``net`` on every image of ``sets`` ({name: [files]}) and cut its latents into window points."""
    import torch

    window = patch // LATENT_STRIDE
    bary, residual, labels, names, counts = [], [], [], [], {}
    for name, files in sets.items():
        counts[name] = len(files)
        for path in files:
            img = read_rgb(path)
            x = torch.from_numpy(img).permute(2, 0, 1)[None].to(_device(net))
            with torch.no_grad():
                _, _, z_bary, res = net(x, return_latents=True)
            h, w = img.shape[:2]
            b = window_means(z_bary[0], h, w, window)
            bary.append(b)
            residual.append(window_means(res[0], h, w, window))
            labels += [name] * len(b)
            names += [os.path.splitext(os.path.basename(path))[0]] * len(b)
    return Embeddings(np.concatenate(bary), np.concatenate(residual), labels, names, counts)


def set_folders(root: str, wanted: Optional[Sequence[str]]) -> dict:
    """{set: its LQ image files} for ROOT/<set>/lq; every set when ``wanted`` is None."""
    from ..errors import did_you_mean

    if not os.path.exists(root):
        raise UsageError(f'--data {root}: no such folder ({_cwd_note()}).')
    if not os.path.isdir(root):
        raise UsageError(f'--data {root} is not a folder; give the folder that holds <set>/lq/ '
                         '(e.g. datasets/demo/val).')
    available = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n, 'lq')))
    if wanted is None:
        if not available:
            raise DataError(f'--data {root} has no <set>/lq folders; give the folder that holds one folder per '
                            'degradation, each with an lq/ folder of images (e.g. datasets/demo/val).')
        order = {name: i for i, name in enumerate(KNOWN_SETS)}
        wanted = sorted(available, key=lambda n: (order.get(n, len(order)), n))
    for name in wanted:
        if name not in available:
            raise UsageError(f'--sets {name}: {os.path.join(root, name, "lq")} is not a folder'
                             f'{did_you_mean(name, available)}; the sets under {root} are {available}.')
    if len(set(wanted)) != len(wanted):
        raise UsageError(f'--sets {" ".join(wanted)}: a set is named twice; name each once.')
    if len(wanted) < 2:
        raise UsageError(f'the t-SNE compares degradations and needs at least two sets; found {list(wanted)} under '
                         f'{root} (give more with --sets, or a --data folder with more <set>/lq folders).')
    return {name: list_images(os.path.join(root, name, 'lq'), f'--data {root}: set {name!r}:') for name in wanted}


EXACT_TSNE_POINTS = 500  # up to this many points the exact t-SNE is faster than Barnes-Hut (and exact)


def tsne_2d(features: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    TSNE, _ = _sklearn()
    method = 'exact' if len(features) <= EXACT_TSNE_POINTS else 'barnes_hut'
    return TSNE(n_components=2, perplexity=perplexity, init='pca', random_state=seed,
                method=method).fit_transform(features)


def silhouette(points: np.ndarray, labels: Sequence[str]) -> float:
    """Silhouette score of ``points`` grouped by ``labels`` (euclidean): 1 = tight separate clusters, ~0 or
    below = the groups mix."""
    _, silhouette_score = _sklearn()
    return float(silhouette_score(points, list(labels)))


def tsne_figure(emb: Embeddings, coords: dict, scores: dict, title: str, caption: str):
    """Two panels, barycenter and residual, points coloured by degradation (and shaped by image when the
    sets share a few image names)."""
    from matplotlib.lines import Line2D

    Figure = _matplotlib_figure()
    sets = list(emb.image_counts)
    images = sorted(set(emb.images))
    markers = 'os^DvP*X' if len(images) <= 8 else None
    colours = [f'C{i}' for i in range(10)]
    fig = Figure(figsize=(11, 5.6), layout='constrained')
    axes = fig.subplots(1, 2)
    labels, names = np.array(emb.sets), np.array(emb.images)
    panels = (('bary', 'Barycenter embeddings $z_B$'), ('residual', 'Residual embeddings $z - z_B$'))
    for ax, (key, head) in zip(axes, panels):
        xy = coords[key]
        for i, s in enumerate(sets):
            for k, image in enumerate(images if markers else [None]):
                pick = (labels == s) & ((names == image) if image is not None else True)
                if pick.any():
                    ax.scatter(xy[pick, 0], xy[pick, 1], s=22, c=colours[i % 10],
                               marker=markers[k] if markers else 'o', alpha=0.8, linewidths=0)
        flat, full = scores[key]
        ax.set_title(f'{head}\nsilhouette by degradation: {flat:.2f} (2-D), {full:.2f} ({emb.bary.shape[1]}-D)',
                     fontsize=11)
        ax.set_xlabel('t-SNE 1')
        ax.set_ylabel('t-SNE 2')
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect('equal', adjustable='datalim')
    handles = [Line2D([], [], ls='', marker='o', color=colours[i % 10], label=f'{s} ({emb.image_counts[s]} img)')
               for i, s in enumerate(sets)]
    heading = 'colour: degradation'
    if markers and len(images) > 1:
        # one legend: a second one would collide with the caption under the panels
        heading += '\nmarker: image'
        handles += [Line2D([], [], ls='', marker=markers[k], color='0.35', label=_short(image, 18))
                    for k, image in enumerate(images)]
    fig.legend(handles=handles, title=heading, loc='outside right upper', fontsize=9, title_fontsize=9)
    fig.suptitle(title, fontsize=12)
    fig.supxlabel(caption, fontsize=9)
    return fig


def run_tsne(args: argparse.Namespace) -> int:
    check_output(args.output, args.overwrite)
    if args.patch % LATENT_STRIDE:
        raise UsageError(f'--patch {args.patch}: the latent is at 1/{LATENT_STRIDE} of the image, so the window must '
                         f'be a multiple of {LATENT_STRIDE} pixels (e.g. 16 or 32).')
    if args.perplexity <= 0:
        raise UsageError(f'--perplexity {args.perplexity}: must be above 0 (t-SNE uses 5 to 50; default 30).')
    sets = set_folders(args.data, args.sets)
    if args.max_images is not None:
        sets = {name: files[:args.max_images] for name, files in sets.items()}
    _sklearn()  # before the network runs: a missing scikit-learn is said at once
    loaded = load(args)
    if getattr(loaded.net, 'embedding_mode', None) != 'barycenter+residual':
        from ..errors import CheckpointError
        raise CheckpointError(f'--weights {args.weights}: a {loaded.options.get("type")} with embedding_mode '
                              f'{loaded.options.get("embedding_mode", getattr(loaded.net, "embedding_mode", None))!r} '
                              'has no barycenter and residual embeddings to show; give a BaryIR trained with '
                              "embedding_mode 'barycenter+residual'.")
    emb = collect_embeddings(loaded.net, sets, args.patch)
    n = len(emb.sets)
    if n < 6:
        raise DataError(f'--data {args.data}: only {n} points from {sum(emb.image_counts.values())} images; give more '
                        f'or larger images, or a smaller --patch (now {args.patch}).')
    perplexity = args.perplexity
    if perplexity > (n - 1) / 3:
        perplexity = max(1.0, (n - 1) / 3)
        print(f'--perplexity {args.perplexity:g} is too high for {n} points; using {perplexity:.1f}.')
    coords, scores = {}, {}
    for key in ('bary', 'residual'):
        features = getattr(emb, key)
        coords[key] = tsne_2d(features, perplexity, args.seed)
        scores[key] = (silhouette(coords[key], emb.sets), silhouette(features, emb.sets))
    window = args.patch // LATENT_STRIDE
    counts = {s: emb.sets.count(s) for s in emb.image_counts}
    caption = (f'one point = the latent of a {args.patch}x{args.patch}-pixel window ({window}x{window} latent cells, '
               'averaged; non-overlapping, padding left out); '
               f'{n} points ({", ".join(f"{s} {c}" for s, c in counts.items())})\n'
               f't-SNE: perplexity {perplexity:.3g}, seed {args.seed}. Silhouette by degradation, on the 2-D map and '
               'on the embeddings: near 0 or below = degradations mix, towards 1 = they form clusters.')
    fig = tsne_figure(emb, coords, scores, f'BaryIR latent embeddings by degradation: {os.path.basename(args.weights)}',
                      caption)
    for key, head in (('bary', 'barycenter z_B'), ('residual', 'residual z - z_B')):
        flat, full = scores[key]
        print(f'silhouette by degradation, {head}: {flat:.3f} on the t-SNE map, {full:.3f} on the '
              f'{emb.bary.shape[1]}-D embeddings ({n} points)')
    # a residual that is tiny next to z_B means a barycenter map close to the identity: both panels then
    # show the same structure, whatever the training claimed
    size = np.linalg.norm(emb.residual, axis=1).mean() / max(np.linalg.norm(emb.bary, axis=1).mean(), 1e-12)
    print(f'mean L2 norm of the residual points / of the barycenter points: {size:.3f}')
    save_figure(fig, args.output)
    print(f'wrote {args.output}')
    return 0


# --------------------------------------------------------------------------------------------------
# test-time ablation
@dataclass
class Ablation:
    image: np.ndarray
    full: np.ndarray  # R3
    no_bary: np.ndarray  # R1: the barycenter features zeroed
    no_residual: np.ndarray  # R2: the residual features zeroed
    target: Optional[np.ndarray]


def ablate(net, img: np.ndarray, weights: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(R3, R1, R2): ``net`` on ``img`` as it is, with its barycenter features zeroed, with its residual
    features zeroed (BaryIR journal, Fig. 9)."""
    from ..errors import CheckpointError

    previous = getattr(net, 'zero_features', None)
    out = []
    try:
        for which in (None, 'barycenter', 'residual'):
            try:
                net.set_zero_features(which)
            except (AttributeError, ValueError) as e:
                raise CheckpointError(f'--weights {weights}: the ablation zeroes the barycenter and the residual '
                                      f'features in turn, which this network cannot ({e}); give a BaryIR trained '
                                      "with embedding_mode 'barycenter+residual'.") from None
            out.append(restore(net, img))
    finally:
        if hasattr(net, 'set_zero_features'):
            net.set_zero_features(previous)
    return out[0], out[1], out[2]


def difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel |a - b|, averaged over the RGB channels (intensity units, 0-1)."""
    return np.abs(a - b).mean(axis=2)


def ablation_figure(result: Ablation, name: str, title: str):
    """Top row: input, full restoration R3, R1, R2. Bottom row: the target (when given), a note, and under R1
    and R2 their difference to R3, on one colour scale."""
    Figure = _matplotlib_figure()
    d1, d2 = difference(result.no_bary, result.full), difference(result.no_residual, result.full)
    # one scale for both maps, so their brightness compares; a few extreme pixels would darken the rest
    vmax = float(np.percentile(np.concatenate([d1.ravel(), d2.ravel()]), 99.5)) or 1e-6
    with_target = result.target is not None
    h, w = result.image.shape[:2]
    cell_h = CELL_INCHES * h / w
    fig = Figure(figsize=(4 * CELL_INCHES + 1.1, 2 * cell_h + 1.6), layout='constrained')
    grid = fig.add_gridspec(2, 5, width_ratios=[1, 1, 1, 1, 0.07])
    interpolation = 'nearest' if max(h, w) < 256 else 'antialiased'

    def caption(img: np.ndarray) -> str:
        return f'PSNR {psnr(img, result.target):.2f} dB' if with_target else ''

    panels = (('Input (degraded)', result.image), ('R3: full restoration', result.full),
              ('R1: barycenter zeroed', result.no_bary), ('R2: residual zeroed', result.no_residual))
    for j, (head, img) in enumerate(panels):
        ax = fig.add_subplot(grid[0, j])
        _show(ax, img)
        ax.set_title(head, fontsize=10)
        ax.set_xlabel(caption(img), fontsize=9)
    if with_target:
        ax = fig.add_subplot(grid[1, 0])
        _show(ax, result.target)
        ax.set_title('Target', fontsize=10)
        note_ax = fig.add_subplot(grid[1, 1])
    else:
        note_ax = fig.add_subplot(grid[1, 0:2])
    shown = None
    for j, (head, diff) in ((2, ('|R1 - R3|: what the barycenter adds', d1)),
                            (3, ('|R2 - R3|: what the residual adds', d2))):
        ax = fig.add_subplot(grid[1, j])
        shown = ax.imshow(diff, cmap='magma', vmin=0.0, vmax=vmax, interpolation=interpolation)
        _image_axes(ax)
        ax.set_title(head, fontsize=10)
        ax.set_xlabel(f'mean {diff.mean():.4f}, max {diff.max():.3f}', fontsize=9)
    bar = fig.colorbar(shown, cax=fig.add_subplot(grid[1, 4]), extend='max')
    bar.set_label('|difference|, mean over RGB (0-1)', fontsize=8)
    bar.ax.tick_params(labelsize=8)
    note_ax.axis('off')
    note_ax.text(0.02, 0.5, 'Test-time ablation: the decoder gets\nzeros instead of the barycenter (R1)\n'
                 'or the residual (R2) features.\n\nBoth difference maps share one\n'
                 f'colour scale, 0 to {vmax:.3g}: the 99.5th\npercentile of the two maps\n(brighter pixels are '
                 'clipped).', fontsize=9, va='center', ha='left', transform=note_ax.transAxes)
    fig.suptitle(f'{title}\n{_short(name, 60)} ({w}x{h})' + (', PSNR against the target (RGB, crop border 0)'
                                                              if with_target else ''), fontsize=10)
    return fig, d1, d2, vmax


def run_ablation(args: argparse.Namespace) -> int:
    check_output(args.output, args.overwrite)
    for flag, path in (('-i', args.input), ('--gt', args.gt)):
        if path is None:
            continue
        if not os.path.exists(path):
            raise UsageError(f'{flag} {path}: no such file ({_cwd_note()}).')
        if not is_image_file(path):
            raise UsageError(f'{flag} {path} is not an image file ({", ".join(IMAGE_EXTENSIONS)}); the ablation '
                             'figure is made for one image.')
    img = read_rgb(args.input)
    target = read_rgb(args.gt) if args.gt else None
    if target is not None and target.shape != img.shape:
        raise DataError(f'--gt {args.gt} is {target.shape[1]}x{target.shape[0]} but -i {args.input} is '
                        f'{img.shape[1]}x{img.shape[0]} (WxH); give the target of this image.')
    loaded = load(args)
    full, no_bary, no_residual = ablate(loaded.net, img, args.weights)
    result = Ablation(img, full, no_bary, no_residual, target)
    fig, d1, d2, vmax = ablation_figure(result, os.path.basename(args.input),
                                        f'BaryIR test-time feature ablation: {os.path.basename(args.weights)}')
    print(f'mean |R1 - R3| (barycenter zeroed) {d1.mean():.4f}, mean |R2 - R3| (residual zeroed) {d2.mean():.4f} '
          f'(0-1 intensity); colour scale 0 to {vmax:.4g}')
    if target is not None:
        print('PSNR: ' + ', '.join(f'{k} {psnr(v, target):.2f} dB' for k, v in
                                   (('input', img), ('R3 full', full), ('R1 barycenter zeroed', no_bary),
                                    ('R2 residual zeroed', no_residual))))
    save_figure(fig, args.output)
    print(f'wrote {args.output}')
    return 0


# --------------------------------------------------------------------------------------------------
# the command
def _common(p: argparse.ArgumentParser) -> None:
    from ..cli import add_debug_flag

    p.add_argument('--weights', required=True, metavar='CKPT',
                   help='the network: a net_g .pth from training or convert-official (or a bare state dict)')
    p.add_argument('--opt', default=None, metavar='FILE.yml',
                   help="option file whose network_g builds the network (default: the options stored in CKPT, "
                        "else inferred from its weights' shapes)")
    p.add_argument('-o', '--output', required=True, metavar='FIGURE.png', help='the PNG to write')
    p.add_argument('--overwrite', action='store_true', help='replace the output if it exists')
    add_debug_flag(p)


def add_command(sub) -> None:
    from .flags import positive_float
    from ..data.checks import positive_int

    fig = sub.add_parser('figures', help='figures of a trained network: restorations, latent t-SNE, ablation',
                         description='Figures of a trained BaryIR, one PNG each: `grid` (degraded / restored / '
                                     'target with PSNR), `tsne` (the barycenter and residual embeddings by '
                                     'degradation), `ablation` (restoration with either feature zeroed).')
    figures = fig.add_subparsers(dest='figure', metavar='{grid,tsne,ablation}')
    fig.set_defaults(func=lambda args: _no_figure(fig))

    p = figures.add_parser('grid', help='degraded / restored / target, one row per image, PSNR in the captions',
                           description='One row per image: the degraded input, the restoration and the target '
                                       '(a --gt image of the same name), with the PSNR of the degraded and the '
                                       'restored image against the target (RGB, crop border 0).')
    p.add_argument('-i', '--input', required=True, metavar='LQ', help='a degraded image, or a folder of them')
    p.add_argument('--gt', default=None, metavar='GT',
                   help='folder of targets, matched by file name (extension aside); a file for a single -i image')
    p.add_argument('--max-images', type=positive_int, default=8, metavar='N',
                   help='at most N images (the first by name; default 8)')
    _common(p)
    p.set_defaults(func=run_grid)

    p = figures.add_parser('tsne', help='t-SNE of the barycenter and residual embeddings, coloured by degradation',
                           description='t-SNE of the barycenter embeddings z_B and of the residual embeddings '
                                       'z - z_B (BaryIR journal, Fig. 3) of ROOT/<set>/lq images, coloured by '
                                       'degradation, with the silhouette score by degradation of each panel. Each '
                                       'image gives one point per non-overlapping --patch window of its latent.')
    p.add_argument('--data', required=True, metavar='ROOT', help='folder with one <set>/lq/ folder per degradation')
    p.add_argument('--sets', nargs='+', default=None, metavar='SET',
                   help='the sets to show (default: every <set> with an lq folder under ROOT)')
    p.add_argument('--patch', type=positive_int, default=16, metavar='N',
                   help='window in pixels, a multiple of 8, that one point averages the latent over (default 16)')
    p.add_argument('--perplexity', type=positive_float, default=30.0, metavar='P',
                   help='t-SNE perplexity (default 30; lowered to a third of the points when there are few)')
    p.add_argument('--seed', type=int, default=0, metavar='S', help='t-SNE random seed (default 0)')
    p.add_argument('--max-images', type=positive_int, default=None, metavar='N',
                   help='at most N images per set (the first by name; default all)')
    _common(p)
    p.set_defaults(func=run_tsne)

    p = figures.add_parser('ablation', help='restoration with the barycenter or residual features zeroed',
                           description='Test-time feature ablation (BaryIR journal, Fig. 9): the full '
                                       'restoration R3, R1 with the barycenter features zeroed, R2 with the '
                                       'residual features zeroed, and |R1 - R3|, |R2 - R3| on one colour scale.')
    p.add_argument('-i', '--input', required=True, metavar='IMAGE', help='the degraded image')
    p.add_argument('--gt', default=None, metavar='GT', help='its target, for PSNRs in the captions')
    _common(p)
    p.set_defaults(func=run_ablation)


def _no_figure(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2

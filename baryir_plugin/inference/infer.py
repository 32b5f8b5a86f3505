"""``baryir infer``: restore image files and folders with any weights file, at any size, without ground truth.

    baryir infer -i photo.jpg -o restored/ --weights net_g_latest.pth
    baryir infer -i folder/ -o out/ --weights BaryIR_5D.pt --device cuda --precision bf16 --self-ensemble

Weights: see :mod:`baryir_plugin.inference.weights` (ours with stored options, converted or original
release files, bare state dicts with ``--opt``). Images: see :mod:`baryir_plugin.inference.images` (same
size, bit depth, grey/colour and alpha out as in). Large images: ``--tile auto`` (the default) restores
an image whole when it fits (the CPU: the planned peak against ``--max-memory``; a GPU: by trying) and
otherwise runs it streamed in tiles, which gives the same result (:mod:`baryir_plugin.inference.tiling`),
halving the tile until it fits; ``--tile N`` streams in N-pixel tiles, ``--tile 0`` never tiles, and
``--tile-mode blend`` restores overlapping tiles independently with feathered blending instead.

A file that cannot be read or restored is reported by name and the rest are still processed; the
summary lists it and the command exits 1. Existing outputs are kept unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..errors import BaryIRError, DataError, UsageError

__all__ = ['Restorer', 'add_command', 'run']

PRECISIONS = ('fp32', 'bf16', 'fp16')
TILE_MODES = ('exact', 'blend')
EXTENSIONS = ('auto', 'png', 'jpg', 'jpeg', 'tif', 'tiff', 'bmp', 'webp', 'exr')
AUTO_TILES = (1024, 512, 256, 128, 64)  # tried in turn when a whole image does not fit
DEFAULT_OVERLAP = 32
MEMORY_SHARE = 0.8  # of the memory available at the start: the default CPU budget


def _tile(text: str):
    if text == 'auto':
        return 'auto'
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give auto, 0 (never tile) or a tile side in pixels (>= 16)") \
            from None
    if value != 0 and value < 16:
        raise argparse.ArgumentTypeError(f'{value}: a tile side must be at least 16 pixels (or 0: never tile)')
    return value


def add_command(sub) -> None:
    from ..analysis.flags import positive_float
    from ..cli import add_debug_flag
    from ..data.checks import non_negative_int

    p = sub.add_parser('infer', help='restore image files or folders with a weights file',
                       description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-i', '--input', required=True, help='an image file or a folder of images')
    p.add_argument('-o', '--output', required=True, help='output folder (created)')
    p.add_argument('--weights', required=True,
                   help='a .pth of this package, a converted or original release file, or a state dict (+ --opt)')
    p.add_argument('--opt', default=None, help='option file whose network_g gives the network (wins over the '
                                               'options stored in the weights file)')
    p.add_argument('--tile', type=_tile, default='auto',
                   help='auto (default: whole when it fits, else tiles), 0 (never tile) or a tile side in pixels')
    p.add_argument('--tile-mode', choices=TILE_MODES, default='exact',
                   help='exact (default: streamed layer by layer, the same result as untiled) or blend '
                        '(independent overlapping tiles, feathered)')
    p.add_argument('--tile-overlap', type=non_negative_int, default=None,
                   help=f'overlap of blended tiles in pixels (default {DEFAULT_OVERLAP}; exact tiles need none)')
    p.add_argument('--device', default='auto', help='cpu, cuda, cuda:N or auto (default: cuda when there is one)')
    p.add_argument('--precision', choices=PRECISIONS, default='fp32',
                   help='fp32 (default), or bf16/fp16 autocast (the fragile parts stay float32)')
    p.add_argument('--max-memory', type=positive_float, default=None, metavar='GIB',
                   help=f'CPU memory budget for --tile auto (default: {MEMORY_SHARE * 100:.0f}%% of the memory available)')
    p.add_argument('--suffix', default='', help='added to each output file name before its extension')
    p.add_argument('--ext', choices=EXTENSIONS, default='auto', help="output format (default auto: the input's)")
    p.add_argument('--jpeg-quality', type=int, default=95, help='JPEG quality of .jpg outputs (default 95)')
    p.add_argument('--self-ensemble', action='store_true',
                   help='average the restorations of the 8 rotations and flips (8x the time)')
    p.add_argument('--overwrite', action='store_true', help='replace outputs that exist')
    p.add_argument('--quiet', action='store_true', help='no progress bars')
    add_debug_flag(p)
    p.set_defaults(func=run)


def _size(n: float) -> str:
    return f'{n / 2**30:.1f} GiB' if n >= 2**30 else f'{n / 2**20:.0f} MiB'


# --------------------------------------------------------------------------------------------------
@dataclass
class Restorer:
    """Restores RGB float images with one network on one device, choosing whole or tiled per image."""
    net: object
    options: dict
    device: object
    precision: str = 'fp32'
    tile: object = 'auto'
    tile_mode: str = 'exact'
    overlap: int = DEFAULT_OVERLAP
    self_ensemble: bool = False
    max_memory: Optional[int] = None  # bytes (CPU budget for 'auto')
    log: Callable[[str], None] = print
    tick: Optional[Callable[[], None]] = None
    _meta_net: object = field(default=None, repr=False)
    _plans: dict = field(default_factory=dict, repr=False)  # (shape, tile) -> planned bytes
    last_plan: str = ''

    def autocast(self):
        import torch

        if self.precision == 'fp32':
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == 'bf16' else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    @property
    def streams(self) -> bool:
        from .tiling import can_stream
        return self.tile_mode == 'exact' and can_stream(self.net)

    # -- the three ways of running one view ---------------------------------------------------------
    def _whole(self, x):
        with self.autocast():
            return self.net(x.to(self.device)).float().cpu()

    def _tiled(self, x, tile: int):
        from .tiling import StreamedRunner, blended_forward, streamed_forward

        if self.streams:
            runner = StreamedRunner(tile, self.device, autocast=self.autocast, progress=self.tick)
            return streamed_forward(self.net, x, runner)
        return blended_forward(self._whole, x, tile, min(self.overlap, tile // 2), progress=self.tick)

    def _ensemble(self, fn, x):
        if not self.self_ensemble:
            return fn(x)
        from ..models.baryir_model import dihedral_ensemble
        return dihedral_ensemble(fn, x)

    # -- planning -----------------------------------------------------------------------------------
    def _meta(self):
        if self._meta_net is None:
            import torch

            from .weights import build_network
            with torch.device('meta'):
                self._meta_net = build_network(self.options, 'the network options').eval()
        return self._meta_net

    def _planned(self, shape, tile: Optional[int]) -> int:
        import torch

        from .memory import planned_peak
        from .tiling import StreamedRunner, streamed_forward

        key = (tuple(shape), tile)
        if key in self._plans:
            return self._plans[key]
        net = self._meta()
        pixels = shape[-2] * shape[-1]
        if tile is None:
            need = planned_peak(net, shape)
        elif self.streams:
            meta = torch.device('meta')

            def streamed(x):
                return streamed_forward(net, x, StreamedRunner(tile, meta, host=meta))

            # host maps grow with the pixels, a tile's working set does not: measured on 2x2 and 3x3 tiles and
            # extrapolated (planning the image itself would walk all of its tiles, minutes for a large photo)
            small, large = (1, 3, 2 * tile, 2 * tile), (1, 3, 3 * tile, 3 * tile)
            if pixels <= 9 * tile * tile:
                need = planned_peak(streamed, shape)
            else:
                a, b = planned_peak(streamed, small), planned_peak(streamed, large)
                need = int(b + (b - a) / (5 * tile * tile) * (pixels - 9 * tile * tile))
        else:
            need = planned_peak(net, (1, 3, min(tile, shape[-2]), min(tile, shape[-1]))) + 16 * pixels
        self._plans[key] = need
        return need

    def _cpu_plan(self, x, name: str) -> Optional[int]:
        """None (whole) or the tile side that fits the CPU budget."""
        budget = self.max_memory
        whole = self._planned(tuple(x.shape), None)
        if budget is None or whole <= budget:
            return None
        for tile in AUTO_TILES:
            if tile >= max(x.shape[-2:]):
                continue
            need = self._planned(tuple(x.shape), tile)
            if need <= budget:
                self.log(f'{name}: needs about {_size(whole)} whole, over the {_size(budget)} budget; restoring '
                         f'it in {tile}-pixel tiles (about {_size(need)}).')
                return tile
        raise DataError(f'{name}: needs about {_size(whole)} whole and more than the {_size(budget)} budget even in '
                        f'{AUTO_TILES[-1]}-pixel tiles; raise --max-memory or free memory.')

    def restore(self, rgb, name: str = 'image'):
        """The restored (H, W, 3) float32 array of an (H, W, 3) float32 RGB array in [0, 1]."""
        import torch

        x = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).contiguous()
        with torch.no_grad():
            if self.tile != 'auto':
                self.last_plan = 'whole' if self.tile == 0 else f'{self.tile}-pixel tiles'
                out = self._ensemble(self._whole if self.tile == 0 else (lambda v: self._tiled(v, self.tile)), x)
            else:
                first = self._cpu_plan(x, name) if self.device.type == 'cpu' else None
                out = self._auto(x, name, first)
        return out.clamp_(0, 1)[0].permute(1, 2, 0).numpy()

    def _auto(self, x, name: str, first: Optional[int]):
        """Whole (``first`` None) or in ``first``-pixel tiles; out of memory, again in the next smaller tiles."""
        tiles = [first] + [t for t in AUTO_TILES if t < (first or max(x.shape[-2:]))]
        for i, tile in enumerate(tiles):
            try:
                out = self._ensemble(self._whole if tile is None else (lambda v: self._tiled(v, tile)), x)
                self.last_plan = 'whole' if tile is None else f'{tile}-pixel tiles'
                return out
            except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one; the CPU allocator raises the base class
                if not _out_of_memory(e):
                    raise
                _release(self.device)
                where = 'whole' if tile is None else f'in {tile}-pixel tiles'
                if i + 1 == len(tiles):
                    raise DataError(f'{name}: out of {self.device.type.upper()} memory {where}; use a smaller '
                                    '--tile, --precision bf16, or free memory.') from None
                self.log(f'{name}: out of {self.device.type.upper()} memory {where}; retrying in {tiles[i + 1]}-pixel '
                         'tiles.')
        raise AssertionError('unreachable')


def _out_of_memory(error: RuntimeError) -> bool:
    import torch

    text = str(error)
    return (isinstance(error, torch.cuda.OutOfMemoryError) or 'out of memory' in text
            or "can't allocate memory" in text or 'not enough memory' in text)


def _release(device) -> None:
    import gc

    import torch
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
def _device(text: str):
    import torch

    from ..analysis.machine import check_device
    if text == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(check_device(text))


def _output_paths(inputs: list[str], out_dir: str, suffix: str, ext: str) -> dict[str, str]:
    """Input -> output path; outputs that would land on an input or on each other are a UsageError."""
    outputs, seen = {}, {}
    for path in inputs:
        stem, in_ext = os.path.splitext(os.path.basename(path))
        out_ext = in_ext.lower() if ext == 'auto' else '.' + ext  # written in lower case (images.output_extension)
        out = os.path.join(out_dir, f'{stem}{suffix}{out_ext}')
        if os.path.exists(out) and os.path.samefile(out, path):
            raise UsageError(f'the output of {path} would be the input itself; give another -o folder or a --suffix.')
        key = os.path.normcase(os.path.abspath(out)).casefold()  # a.PNG and a.png are one file on some systems
        if key in seen:
            raise UsageError(f'{seen[key]} and {path} would both be written to {out}; give --ext auto or restore '
                             'them into separate folders.')
        seen[key] = path
        outputs[path] = out
    return outputs


def run(args: argparse.Namespace) -> int:
    import torch

    from .images import list_inputs, output_extension, read_picture, write_picture
    from .memory import available_bytes
    from .weights import load_network

    if os.sep in args.suffix or (os.altsep and os.altsep in args.suffix):
        raise UsageError(f'--suffix {args.suffix!r} holds a path separator; give a plain name part such as _restored.')
    if not 1 <= args.jpeg_quality <= 100:
        raise UsageError(f'--jpeg-quality {args.jpeg_quality}: give 1 to 100.')
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UsageError(f'-o {args.output} is a file; give a folder for the restored images.')
    device = _device(args.device)
    if args.precision == 'bf16' and device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise UsageError('--precision bf16: this GPU has no bfloat16; use --precision fp16 or fp32.')
    say = _Console(args.quiet)
    inputs = list_inputs(args.input)
    outputs = _output_paths(inputs, args.output, args.suffix, args.ext)
    if args.tile_overlap is not None and args.tile_mode == 'exact':
        say.log('--tile-overlap is for --tile-mode blend; exact tiles need no overlap (ignored).')
    loaded = load_network(args.weights, args.opt, device, log=say.log)
    say.log(f'network: {loaded.describe()}; device {device}, {args.precision}')
    budget = None
    if device.type == 'cpu':
        budget = int(args.max_memory * 2 ** 30) if args.max_memory else None
        if budget is None and available_bytes() is not None:
            budget = int(available_bytes() * MEMORY_SHARE)
    restorer = Restorer(loaded.net, loaded.options, device, args.precision, args.tile, args.tile_mode,
                        DEFAULT_OVERLAP if args.tile_overlap is None else args.tile_overlap, args.self_ensemble,
                        budget, log=say.log, tick=say.tick)
    restored, skipped, failed = [], [], []
    seconds = megapixels = 0.0
    os.makedirs(args.output, exist_ok=True)
    for path in say.files(inputs):
        out = outputs[path]
        if os.path.exists(out) and not args.overwrite:
            skipped.append(out)
            continue
        try:
            picture = read_picture(path)
            final = os.path.splitext(out)[0] + output_extension(picture, args.ext)
            start = time.perf_counter()
            result = restorer.restore(picture.rgb, path)
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - start
            megapixels += picture.megapixels
            write_picture(final, picture, result, args.jpeg_quality)
        except (BaryIRError, OSError) as e:
            from ..errors import user_message
            why = (user_message(e) if isinstance(e, OSError) else None) or str(e)
            failed.append((path, why if path in why or (e.filename and str(e.filename) in why)
                           else f'{path}: {why}'))
            say.log(f'failed: {failed[-1][1]}')
            continue
        notes = ', '.join([restorer.last_plan] + picture.notes)
        restored.append(final)
        say.log(f'{path} -> {final} ({picture.rgb.shape[1]}x{picture.rgb.shape[0]}, {notes})')
    say.close()
    rate = f'; {seconds / megapixels:.2f} s per megapixel' if megapixels else ''
    print(f'restored {len(restored)}, skipped {len(skipped)}' + (' (outputs exist; --overwrite replaces them)'
                                                                 if skipped else '')
          + f', failed {len(failed)}{rate} -> {args.output}')
    if len(inputs) > 1:  # a folder: its failures again, together (each was also said as it happened)
        for path, why in failed:
            print(f'  failed: {why}', file=sys.stderr)
    return 1 if failed else 0


class _Console:
    """Progress bars over files and tile passes (tqdm, on a terminal) and log lines that do not break them."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self._bar = None
        self._tiles = None

    def files(self, inputs: list[str]):
        from tqdm import tqdm

        self._bar = tqdm(inputs, desc='images', unit='img', disable=self.quiet or None, file=sys.stderr)
        self._tiles = tqdm(desc='tile passes', unit='pass', leave=False, disable=self.quiet or None,
                           file=sys.stderr)
        return self._bar

    def tick(self) -> None:
        if self._tiles is not None:
            self._tiles.update()

    def log(self, text: str) -> None:
        from tqdm import tqdm
        tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        for bar in (self._tiles, self._bar):
            if bar is not None:
                bar.close()

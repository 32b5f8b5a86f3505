"""Command-line checks of the benchmark and study scripts: every bad flag is one UsageError line that names
the flag and the fix (behind ``errors.guarded_main``), raised before any work starts.

The numeric flags are argparse types (``positive_int``, ``non_negative_int``, ``positive_float``,
``non_negative_float``); :func:`tool_parser` is the dataset tools' one-line argparse parser with the
script's name; :func:`check_network` builds BaryIR (and the potentials) on the meta device, so that a width, block
count or crop the networks refuse is named by its flag instead of failing in the middle of a run.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Optional, Sequence

from ..data.checks import ToolParser, non_negative_int, positive_int
from ..errors import UsageError

__all__ = ['check_network', 'check_output_file', 'non_negative_float', 'non_negative_int', 'positive_float',
           'positive_int', 'tool_parser']

# BaryIR's attention heads per level (its default, which the scripts keep)
HEADS = (1, 2, 4, 8)


def tool_parser(prog: str, doc: str, full_doc: bool = False) -> ToolParser:
    """The argparse parser of ``scripts/<name>.py``: its own errors are one UsageError line (exit 2).
    ``full_doc``: the whole docstring as the --help description (else its first paragraph)."""
    if full_doc:
        return ToolParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    return ToolParser(prog=prog, description=doc.split('\n\n')[0])


def _float_at_least(text: str, low: float, strict: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise argparse.ArgumentTypeError(f'must be {"greater than" if strict else "at least"} {low:g}, got {text}')
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _float_at_least(text, 0.0, strict=True)


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _float_at_least(text, 0.0, strict=False)


def check_network(dim: int, num_blocks: Sequence[int] = (4, 6, 6, 8), num_refinement_blocks: Optional[int] = None,
                  num_bary_blocks: Optional[int] = None, sources: Optional[int] = None,
                  crop: Optional[int] = None) -> None:
    """UsageError naming the flag (--dim, --crop, --sources, ...) when BaryIR or, with ``sources``, the
    barycenter potentials cannot be built from these values."""
    if dim % 2:  # the level-2 decoder tail runs 2 x dim channels with the 4 heads of level 3
        raise UsageError(f'--dim {dim}: BaryIR splits its attention widths over its heads (the level-2 decoder '
                         f'tail: {2 * dim} channels over {HEADS[2]} heads), so the width must be even; use e.g. '
                         f'--dim {dim + 1} (8: the demo network, 48: the default).')
    if crop is not None and (crop % 8 or crop < 16):
        near = max(16, 8 * math.ceil(crop / 8))
        raise UsageError(f'--crop {crop}: the potentials score the latent of the crop (1/8 of its side), so the crop '
                         f'must be a multiple of 8 and at least 16; use e.g. --crop {near}.')
    import torch

    from ..archs import BaryIR, BarycenterPotentials

    names = '--dim, --num-blocks, --num-refinement-blocks, --num-bary-blocks'
    refine = num_refinement_blocks if num_refinement_blocks is not None else num_blocks[0]
    with torch.device('meta'):  # the constructors' own checks, without allocating the weights
        try:
            BaryIR(dim=dim, num_blocks=list(num_blocks), num_refinement_blocks=refine, num_bary_blocks=num_bary_blocks)
        except ValueError as e:
            raise UsageError(f'{names}: BaryIR cannot be built from these values ({e}); change them.') from None
        if sources is not None:
            try:
                BarycenterPotentials(num_potentials=sources, in_channels=8 * dim, patch_size=crop or 128)
            except ValueError as e:
                raise UsageError(f'--sources {sources} / --crop {crop} / --dim {dim}: the barycenter potentials '
                                 f'cannot be built from these values ({e}); change them.') from None


def check_output_file(path: Optional[str], flag: str) -> None:
    """UsageError naming ``flag`` when the file ``path`` could not be written at the end of a run: it is a
    folder, or a file stands where one of its folders would be."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f'{flag} {path}: is a folder; give a file name (e.g. {target / "out.json"}).')
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f'{flag} {path}: {parent} is a file, not a folder; give another path.')
            break

"""Export of a trained network: ONNX for runtimes outside PyTorch, safetensors for weights without pickle.

``baryir export-onnx --weights CKPT -o model.onnx [--opt FILE.yml] [--opset N] [--overwrite]`` writes a
graph with one input ``input`` (B, C, H, W) and one output ``output`` of the same shape; batch, height and
width are free. BaryIR pads its input to a multiple of 8 with Python integers, which a trace would freeze
at the example's size, so the graph exported is that of :class:`PadToMultiple` (the padding done by
tensor operations, the result cropped back to H x W): any H x W runs. Before the file is written the
model is run in onnxruntime on the CPU at two sizes the trace did not see (one not a multiple of 8, one
of batch 2) and compared with the PyTorch network; the largest difference is printed, and a model that
disagrees is not written. The network options are stored in the model's metadata (``baryir_config``).
Needs ``pip install onnx onnxruntime``; the exporter is PyTorch's TorchScript-based one (``dynamo=False``),
which needs no onnxscript.

``baryir export-safetensors --weights CKPT -o FILE.safetensors [--opt FILE.yml] [--overwrite]`` writes the
weights with the network options as JSON in the file's metadata (``baryir_config``), so that the file
alone rebuilds the network; :func:`read_safetensors` reads such a file back. Needs ``pip install
safetensors``.

Both read every weights file :func:`~baryir_plugin.inference.weights.load_network` accepts, and never
replace an existing output without ``--overwrite``; outputs are written atomically.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import time
import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..archs.baryir_arch import PAD_MULTIPLE
from ..checkpoints import NETWORK_OPTIONS_KEY
from ..errors import CheckpointError, SetupError, UsageError

__all__ = ['PadToMultiple', 'check_onnx', 'export_onnx', 'looks_like_safetensors', 'read_safetensors',
           'write_safetensors']

INPUT_NAME, OUTPUT_NAME = 'input', 'output'
DEFAULT_OPSET = 17  # the first with LayerNormalization; read by every onnxruntime of the last years
# 11 and older export the padding's Range in a form onnxruntime refuses; 20 is the newest opset of
# PyTorch's TorchScript-based exporter
OPSETS = range(13, 21)
TRACE_SIZE = (48, 64)  # (H, W) of the traced example: a multiple of 8, batch 1
# (B, H, W) of the check: sizes the trace did not see, so that a size frozen into the graph shows
CHECK_SIZES = ((1, 37, 61), (2, 40, 56))
# The graph computes what the network computes, in float32 with other kernels: differences are rounding
# (1e-7..1e-6 measured); 1e-3 is far above that and still a quarter of an 8-bit grey level.
CHECK_TOLERANCE = 1e-3
SAFETENSORS_FORMAT = 'pt'  # the metadata 'format' entry of files holding torch tensors


# --------------------------------------------------------------------------------------------------
# ONNX
class PadToMultiple(nn.Module):
    """``net`` whose input padding to a multiple of 8 is written as tensor operations on the input's shape.

    BaryIR.forward pads with Python integers and a Python ``if``, which a trace records for the example's
    size only. Here the rows and columns of the padded image are gathered by index, the indices computed
    from H and W inside the graph: reflection, as BaryIR pads, or replication where a pad is not smaller
    than its side (a tiny image), again as BaryIR does. The network then always sees a multiple of 8 (its
    own padding does nothing), and its output is cropped back to H x W. Same result as ``net(x)``.
    """

    def __init__(self, net: nn.Module, multiple: Optional[int] = None) -> None:
        super().__init__()
        self.net = net
        self.multiple = multiple or getattr(net, 'pad_multiple', PAD_MULTIPLE)

    def _indices(self, size, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Source rows (or columns) of the padded side: by reflection and by replication."""
        padded = (size + self.multiple - 1) // self.multiple * self.multiple
        i = torch.arange(padded, device=device)
        reflected = torch.where(i < size, i, 2 * (size - 1) - i)  # negative where the pad is >= the side
        return reflected, i.clamp(max=size - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        rows, rows_replicated = self._indices(h, x.device)
        cols, cols_replicated = self._indices(w, x.device)
        # BaryIR reflects only when both pads fit their sides; the last reflected index is the smallest
        reflect = (rows[-1] >= 0) & (cols[-1] >= 0)
        rows = torch.where(reflect, rows, rows_replicated)
        cols = torch.where(reflect, cols, cols_replicated)
        padded = x.index_select(2, rows).index_select(3, cols)  # (B, C, ceil8(H), ceil8(W))
        return self.net(padded)[..., :h, :w]


def _import_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise SetupError(f'export-onnx needs onnx and onnxruntime ({e}); pip install onnx onnxruntime') from None
    return onnx, onnxruntime


def _in_channels(net: nn.Module) -> int:
    return int(getattr(net, 'in_channels', 3))


def export_onnx(net: nn.Module, opset: int = DEFAULT_OPSET, options: Optional[dict] = None) -> bytes:
    """The ONNX model (serialised) of ``net`` behind :class:`PadToMultiple`: free batch, height and width.

    ``options``: the network options, stored as JSON in the model's metadata (``baryir_config``).
    """
    onnx, _ = _import_onnx()
    from ..version import __version__

    example = torch.rand(1, _in_channels(net), *TRACE_SIZE, generator=torch.Generator().manual_seed(0))
    free = {0: 'batch', 2: 'height', 3: 'width'}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # the trace's warnings are about the Python branches PadToMultiple makes constant, and the
        # exporter's about itself; check_onnx measures the result at other sizes
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        warnings.simplefilter('ignore', DeprecationWarning)
        torch.onnx.export(PadToMultiple(net).eval(), (example,), buffer, dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: free, OUTPUT_NAME: free})
    model = onnx.load_from_string(buffer.getvalue())
    model.producer_name, model.producer_version = 'baryir-plugin', __version__
    if options is not None:
        entry = model.metadata_props.add()
        entry.key, entry.value = NETWORK_OPTIONS_KEY, json.dumps(options, sort_keys=True)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def check_onnx(model: bytes | str, net: nn.Module, sizes: Sequence[tuple[int, int, int]] = CHECK_SIZES,
               seed: int = 0) -> list[tuple[tuple[int, ...], float]]:
    """Run the ONNX ``model`` (bytes or a path) in onnxruntime on the CPU on random images of ``sizes``
    ((B, H, W)) and compare with ``net``; returns ``[(input shape, max abs difference), ...]``."""
    _, ort = _import_onnx()
    session = ort.InferenceSession(model, providers=['CPUExecutionProvider'])
    generator = torch.Generator().manual_seed(seed)
    results = []
    for b, h, w in sizes:
        x = torch.rand(b, _in_channels(net), h, w, generator=generator)
        with torch.no_grad():
            expected = net(x)
        got = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
        if got.shape != expected.shape:
            diff = math.inf
        else:
            diff = float((got - expected).abs().max())
            diff = math.inf if math.isnan(diff) else diff
        results.append((tuple(x.shape), diff))
    return results


def _shape(shape: Sequence[int]) -> str:
    return 'x'.join(str(n) for n in shape)


def run_export_onnx(args: argparse.Namespace) -> int:
    from ..compat import atomic_write
    from .weights import load_network

    _check_output(args.output, {'--weights': args.weights, '--opt': args.opt}, args.overwrite)
    _, ort = _import_onnx()
    loaded = load_network(args.weights, opt=args.opt, device='cpu', log=print)
    print(f'network: {loaded.describe()}')
    start = time.perf_counter()
    model = export_onnx(loaded.net, args.opset, loaded.options)
    print(f'exported (opset {args.opset}, batch, height and width free) in {time.perf_counter() - start:.1f} s')
    checks = check_onnx(model, loaded.net)
    worst = max(diff for _, diff in checks)
    print(f'checked in onnxruntime {ort.__version__} (CPU) against PyTorch: max abs difference '
          + ', '.join(f'{diff:.2e} at {_shape(shape)}' for shape, diff in checks))
    if not worst <= CHECK_TOLERANCE:
        raise SetupError(f'the exported model differs from the PyTorch network by {worst:.3g} (more than '
                         f'{CHECK_TOLERANCE:g}), so {args.output} was not written; try another --opset, or another '
                         f'onnxruntime (installed: {ort.__version__}, torch {torch.__version__}).')
    atomic_write(args.output, lambda f: f.write(model))
    print(f'wrote {args.output} ({len(model) / 2 ** 20:.1f} MiB; input {INPUT_NAME!r} B x '
          f'{_in_channels(loaded.net)} x H x W, float32, any size)')
    return 0


# --------------------------------------------------------------------------------------------------
# safetensors
def _import_safetensors():
    try:
        import safetensors
        import safetensors.torch
    except ImportError as e:
        raise SetupError(f'safetensors files need the safetensors package ({e}); pip install safetensors') from None
    return safetensors


def write_safetensors(state: dict, options: Optional[dict], path: str) -> None:
    """Write ``state`` (name -> tensor) to ``path`` atomically, ``options`` as JSON in the metadata."""
    from ..compat import atomic_write

    safetensors = _import_safetensors()
    # own, contiguous storage per tensor: the format stores no views or tied weights
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in state.items()}
    metadata = {'format': SAFETENSORS_FORMAT}
    if options is not None:
        metadata[NETWORK_OPTIONS_KEY] = json.dumps(options, sort_keys=True)
    data = safetensors.torch.save(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def looks_like_safetensors(path: str) -> bool:
    """Whether ``path`` starts as a safetensors file does (an 8-byte header length, then a JSON object)."""
    try:
        with open(path, 'rb') as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b'{' and 8 + int.from_bytes(head[:8], 'little') <= size


def read_safetensors(path: str, what: str = '--weights') -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    """The state dict of a safetensors file and the network options in its metadata (None when absent).

    A missing, truncated or foreign file, or options that are not a JSON object with a 'type', is one
    CheckpointError naming ``what`` and the file.
    """
    safetensors = _import_safetensors()
    if not os.path.exists(path):
        raise CheckpointError(f'{what} {path}: no such file; fix the path (relative to {os.getcwd()}).')
    if os.path.isdir(path):
        raise CheckpointError(f'{what} {path} is a folder; give the .safetensors file inside it.')
    if not looks_like_safetensors(path):
        raise CheckpointError(f'{what} {path} is not a safetensors file (no safetensors header; truncated, or '
                              'another format?); give a file written by `baryir export-safetensors`.')
    try:
        with safetensors.safe_open(path, framework='pt', device='cpu') as f:
            metadata = f.metadata() or {}
            state = {name: f.get_tensor(name) for name in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        reason = ' '.join(str(e).split())[:160]
        raise CheckpointError(f'{what} {path} cannot be read as safetensors ({reason}; truncated or corrupt?); '
                              'replace it.') from None
    if not state:
        raise CheckpointError(f'{what} {path} holds no tensors; give the file of a network.')
    text = metadata.get(NETWORK_OPTIONS_KEY)
    if text is None:
        return state, None
    try:
        options = json.loads(text)
    except ValueError:
        options = None
    if not (isinstance(options, dict) and isinstance(options.get('type'), str)):
        raise CheckpointError(f"{what} {path}: its '{NETWORK_OPTIONS_KEY}' metadata is not network options (a JSON "
                              "object with 'type'); re-export the file, or give the options with --opt.")
    return state, options


def run_export_safetensors(args: argparse.Namespace) -> int:
    from .weights import load_network

    _check_output(args.output, {'--weights': args.weights, '--opt': args.opt}, args.overwrite)
    _import_safetensors()
    loaded = load_network(args.weights, opt=args.opt, device='cpu', log=print)
    print(f'network: {loaded.describe()}')
    if loaded.weights.extra.get('potentials') is not None:
        print(f'{args.weights} also holds the barycenter potentials (training only); they are not exported.')
    state = loaded.net.state_dict()
    write_safetensors(state, loaded.options, args.output)
    print(f'wrote {args.output} ({len(state)} tensors, {sum(t.numel() for t in state.values()):,} parameters; '
          f"network options in its metadata '{NETWORK_OPTIONS_KEY}')")
    return 0


# --------------------------------------------------------------------------------------------------
# the commands
def _check_output(path: str, inputs: dict[str, Optional[str]], overwrite: bool) -> None:
    """Refuse an output that is a folder, one of the inputs, or (without --overwrite) an existing file."""
    if os.path.isdir(path):
        raise UsageError(f'-o {path} is a folder; give a file name inside it.')
    for flag, given in inputs.items():
        if given is None:
            continue
        same = os.path.abspath(given) == os.path.abspath(path) or (
            os.path.exists(given) and os.path.exists(path) and os.path.samefile(given, path))
        if same:
            raise UsageError(f'-o {path} is the {flag} file; write the export to another file (the input is kept '
                             'as it is).')
    if os.path.exists(path) and not overwrite:
        raise UsageError(f'-o {path} exists already; pass --overwrite to replace it, or choose another output.')


def _opset(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
    if value not in OPSETS:
        raise argparse.ArgumentTypeError(f'opset {value} is not supported; use {OPSETS[0]}..{OPSETS[-1]} (default '
                                         f'{DEFAULT_OPSET})')
    return value


def _add_common(parser: argparse.ArgumentParser, suffix: str) -> None:
    parser.add_argument('--weights', required=True, metavar='CKPT',
                        help='network weights: a BasicSR .pth (options stored in it or given by --opt), a bare '
                             "state dict, or the authors' release file")
    parser.add_argument('-o', '--output', required=True, metavar=f'FILE{suffix}', help='the file to write')
    parser.add_argument('--opt', default=None, metavar='FILE.yml',
                        help='option file whose network_g gives the network options (default: those stored in '
                             'the weights file)')
    parser.add_argument('--overwrite', action='store_true', help='replace the output file if it exists')


def add_command(sub: argparse._SubParsersAction) -> None:
    """Add ``export-onnx`` and ``export-safetensors`` to the ``baryir`` subcommands."""
    from ..cli import add_debug_flag

    commands: list[tuple[str, str, str, str, Callable[[argparse.Namespace], int]]] = [
        ('export-onnx', '.onnx', 'export a network to ONNX (any batch and image size), checked in onnxruntime',
         'Export the network of a weights file to ONNX: input "input" (B, C, H, W) float32, output "output" of '
         'the same shape, batch, height and width free (the padding to a multiple of 8 is part of the graph). '
         'The model is run in onnxruntime on the CPU and compared with PyTorch before it is written. '
         'Needs: pip install onnx onnxruntime.', run_export_onnx),
        ('export-safetensors', '.safetensors', 'write the weights as safetensors, network options in its metadata',
         'Write the weights of a network as a safetensors file (no pickle), with the network options as JSON '
         f"in its metadata ('{NETWORK_OPTIONS_KEY}'). Needs: pip install safetensors.", run_export_safetensors),
    ]
    for name, suffix, help_text, description, run in commands:
        parser = sub.add_parser(name, help=help_text, description=description)
        _add_common(parser, suffix)
        if name == 'export-onnx':
            parser.add_argument('--opset', type=_opset, default=DEFAULT_OPSET, metavar='N',
                                help=f'ONNX opset, {OPSETS[0]}..{OPSETS[-1]} (default {DEFAULT_OPSET})')
        add_debug_flag(parser)
        parser.set_defaults(func=run)

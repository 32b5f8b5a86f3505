"""``baryir complexity``: parameters, multiply-accumulates, latency and peak memory of a restoration network.

``baryir complexity (-opt FILE.yml | --weights CKPT) [--potentials FILE] [--size H W] [--device cpu|cuda|cuda:N]
[--warmup N] [--runs N] [--no-latency] [--json FILE]``

Every figure is broken down by the module groups of BaryIR (encoder, barycenter map T, latent fusion,
residual decoder, main decoder; another architecture is one group, ``network``), beside the barycenter
potentials that training adds (BarycenterPotentials, from the option file, a potentials file, or the one
found beside the weights). Every parameter belongs to exactly one group, checked on each run, so that a
module added to the network cannot go missing from the table.

Conventions, printed with the figures:

- MACs: mmengine's ``FlopAnalyzer`` (a jit trace of one forward): one multiply-accumulate counts 1 for
  convolutions, matrix products (the MDTA attention's ``q k^T`` and ``attn v``), einsum and
  scaled-dot-product attention; LayerNorm is mmengine's estimate of 5 operations per element. Operators
  it has no rule for (elementwise arithmetic, GELU, softmax, the q/k normalisation, pixel (un)shuffle)
  are listed with their call counts and output elements, not hidden.
- latency: the median, min and max of ``--runs`` forwards after ``--warmup`` untimed ones, under
  ``torch.no_grad``, synchronised on CUDA; the barycenter map T alone is timed on a latent of the input's
  size as well (the journal quotes T's time apart).
- peak memory of one forward: on CUDA, ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats`` (tensors only; no CUDA context, no cached blocks); on the CPU, the resident
  set of a fresh process that builds the same network and runs one forward: its high-water mark, and
  how much that exceeds the resident set just before the forward (this process's own high-water mark
  would include every earlier forward, the trace and the imports).

The journal's figures (BaryIR journal, Tab. XII and XIII) are printed beside a BaryIR network's own.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ..errors import CheckpointError, OptionError, UsageError

# The default BaryIR's groups, in the order the forward runs them (BaryIR journal, Fig. 2); a BaryIR network
# on another backbone reports its own (BaryIR.module_groups)
BARYIR_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ('encoder', ('embed', 'encoder1', 'down1', 'encoder2', 'down2', 'encoder3', 'down3', 'latent', 'latent_norm')),
    ('barycenter map T', ('bary_map',)),
    ('latent fusion', ('fuse_block', 'fuse_proj', 'up3')),
    ('residual decoder', ('residual_decoder',)),
    ('main decoder', ('reduce3', 'decoder3', 'decoder3_tail', 'decoder3_proj', 'up2', 'reduce2', 'decoder2',
                      'decoder2_tail', 'decoder2_proj', 'up1', 'decoder1', 'refinement', 'output')),
)
OTHER_GROUP = 'network'
TOP_LEVEL = '(top level)'  # MACs of operators run by the network's own forward, outside every child module
DEFAULT_SIZE = (256, 256)

# BaryIR journal, Tab. XII (Restormer backbone; one RTX 4090; the input size is not stated) and Tab. XIII
JOURNAL = {
    'parameters_backbone': 26.1e6, 'parameters_bary_map': 8.3e6,
    'parameters_inference': 34.4e6, 'parameters_training': 35.9e6,
    'flops_backbone': 118e9, 'flops_bary_map': 64e9,
    'seconds_backbone': 0.13, 'seconds_bary_map': 0.03,
    'source': 'BaryIR journal, Tab. XII and XIII (Restormer backbone, one RTX 4090, input size not stated)',
}

# Operators mmengine has no rule for, which BaryIR and the potentials run: recorded (calls and output
# elements) instead of only named, so the report can say how much work went uncounted.
_RECORDED_UNCOUNTED = (
    'aten::add', 'aten::add_', 'aten::sub', 'aten::rsub', 'aten::mul', 'aten::mul_', 'aten::div', 'aten::div_',
    'aten::neg', 'aten::gelu', 'aten::softmax', 'aten::leaky_relu', 'aten::linalg_vector_norm', 'aten::clamp_min',
    'aten::rsqrt', 'aten::var', 'aten::mean', 'aten::sum', 'aten::expand_as', 'aten::repeat',
    'aten::pixel_shuffle', 'aten::pixel_unshuffle', 'aten::reflection_pad2d', 'aten::replication_pad2d',
    'aten::pad',
)


# --------------------------------------------------------------------------------------------------
# parameters by group
@dataclass
class Group:
    name: str
    modules: list[str]
    parameters: int = 0
    macs: Optional[int] = None
    present: bool = True  # False: the network was built without these modules (e.g. embedding_mode)


def module_groups(net) -> list[Group]:
    """The groups of ``net``: BaryIR's (encoder, T, latent fusion, residual decoder, decoder, and any its
    backbone adds), or one ``network`` group holding every top-level module."""
    from ..archs.baryir_arch import BaryIR

    children = [name for name, _ in net.named_children()]
    if not isinstance(net, BaryIR):
        return [Group(OTHER_GROUP, children)]
    return [Group(name, list(modules), present=any(m in children for m in modules))
            for name, modules in net.module_groups()]


def count_parameters(net) -> tuple[list[Group], int]:
    """Parameters per group and in total. Raises RuntimeError (a bug of this table) when a parameter is in
    no group or in two, or when the groups do not add up to the total."""
    groups = module_groups(net)
    owner: dict[str, Group] = {}
    for group in groups:
        for module in group.modules:
            if module in owner:
                raise RuntimeError(f'complexity groups: module {module!r} is in both {owner[module].name!r} and '
                                   f'{group.name!r}.')
            owner[module] = group
    total, unowned = 0, []
    for name, p in net.named_parameters():
        total += p.numel()
        group = owner.get(name.split('.', 1)[0])
        if group is None:
            unowned.append(name)
            continue
        group.parameters += p.numel()
    if unowned:
        raise RuntimeError(f'complexity groups: {len(unowned)} parameter(s) of {type(net).__name__} are in no group '
                           f'({", ".join(unowned[:3])}{" ..." if len(unowned) > 3 else ""}); add their module to '
                           'its backbone\'s module_groups().')
    if sum(g.parameters for g in groups) != total:
        raise RuntimeError('complexity groups: the groups do not add up to the parameter count.')
    return groups, total


# --------------------------------------------------------------------------------------------------
# multiply-accumulates
@dataclass
class MacCount:
    total: int
    by_module: dict[str, int]  # top-level module -> MACs ('' = the whole model)
    by_operator: dict[str, int]
    uncounted: dict[str, dict]  # operator -> {'calls': n, 'output_elements': n or None}
    uncalled_modules: list[str]


def _sdpa_macs(inputs, outputs) -> int:
    """scaled_dot_product_attention: q k^T and attn v, (B, h, N, d) x (B, h, M, d) -> B h N M (d + dv)."""
    from mmengine.analysis.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    if q is None or k is None or v is None:
        return 0
    lead = 1
    for s in q[:-2]:
        lead *= s
    return lead * q[-2] * k[-2] * (q[-1] + v[-1])


def count_macs(model, inputs: tuple) -> MacCount:
    """Trace one forward of ``model`` with mmengine's FlopAnalyzer (see the module docstring)."""
    import torch
    from mmengine.analysis import FlopAnalyzer
    from mmengine.analysis.jit_handles import get_shape

    recorded: dict[str, Counter] = {'calls': Counter(), 'elements': Counter()}

    def recorder(op: str) -> Callable:
        def handle(ins, outs):
            recorded['calls'][op] += 1
            shape = get_shape(outs[0]) if outs else None
            if shape is not None:
                n = 1
                for s in shape:
                    n *= s
                recorded['elements'][op] += n
            return Counter()  # counts nothing: the op stays out of the MACs

        return handle

    analyzer = FlopAnalyzer(model, inputs)
    analyzer.set_op_handle(**{'aten::scaled_dot_product_attention': _sdpa_macs},
                           **{op: recorder(op) for op in _RECORDED_UNCOUNTED})
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    analyzer.tracer_warnings('none')
    with torch.no_grad():
        total = int(analyzer.total())
    by_module = {name: int(v) for name, v in analyzer.by_module().items() if '.' not in name}
    by_operator = {op: int(v) for op, v in analyzer.by_operator().items() if v}
    uncounted = {op: {'calls': n, 'output_elements': int(recorded['elements'][op])}
                 for op, n in recorded['calls'].most_common()}
    for op, n in analyzer.unsupported_ops().most_common():
        uncounted[op] = {'calls': int(n), 'output_elements': None}
    return MacCount(total, by_module, by_operator, uncounted, sorted(analyzer.uncalled_modules()))


def group_macs(groups: list[Group], macs: MacCount) -> int:
    """Fill each group's MACs from the per-module counts; returns the MACs outside every group."""
    for group in groups:
        group.macs = sum(macs.by_module.get(m, 0) for m in group.modules)
    return macs.total - sum(g.macs or 0 for g in groups)


# --------------------------------------------------------------------------------------------------
# the potentials
@dataclass
class Potentials:
    module: Any  # BarycenterPotentials, or None when none were found
    source: str  # where they came from, or why there are none
    options: Optional[dict] = None
    parameters: int = 0
    macs: Optional[int] = None
    latent: Optional[tuple] = None  # (C, h, w) the MACs were counted at
    note: str = ''


def _build_potentials(options: dict, where: str, state: Optional[dict] = None):
    from ..inference.weights import build_network

    if options.get('type') != 'BarycenterPotentials':
        raise CheckpointError(f'{where} holds {options.get("type")!r} weights, not barycenter potentials; give a '
                              'net_potential_<iter>.pth or <name>_potential.pth file.')
    module = build_network(options, where).eval().requires_grad_(False)
    if state is not None:
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError:
            raise CheckpointError(f'{where} does not fit BarycenterPotentials built from {options} (other tensor '
                                  'names or shapes); give the potentials saved with the network.') from None
    return module


def _potentials_from_file(path: str, what: str, opt_options: Optional[dict]) -> tuple[Any, dict, str]:
    """(module, options, where its options came from) of a potentials file of any kind read_weights accepts."""
    from ..inference.weights import read_weights
    from ..official import infer_potentials_config

    weights = read_weights(path, what)
    if weights.kind == 'official release':
        released = weights.extra.get('potentials')
        if released is None:
            raise CheckpointError(f'{what} {path} is a release file without potentials; give a potentials file.')
        return _build_potentials(released['baryir_config'], f'{what} {path}', released['params']), \
            released['baryir_config'], 'the release file'
    options, origin = weights.options, 'the file'
    if options is None and opt_options is not None:
        options, origin = opt_options, '-opt network_potential'
    if options is None:
        try:
            options, origin = infer_potentials_config(weights.state), "the weights' shapes"
        except (KeyError, ValueError, IndexError, AttributeError):
            raise CheckpointError(f'{what} {path} stores no options and is not shaped like barycenter potentials; '
                                  'give a net_potential_<iter>.pth file, or -opt with its network_potential.') from None
    return _build_potentials(options, f'{what} {path}', weights.state), options, origin


def potentials_beside(weights_path: str) -> list[str]:
    """Where training (``net_potential_<iter>.pth`` beside ``net_g_<iter>.pth``) and ``convert-official``
    (``<stem>_potential.pth``) put the potentials of a weights file, those that exist."""
    from ..official import potentials_output_path

    folder, name = os.path.split(weights_path)
    candidates = []
    match = re.fullmatch(r'net_g_(.+)\.pth', name)
    if match:
        candidates.append(os.path.join(folder, f'net_potential_{match.group(1)}.pth'))
    candidates.append(potentials_output_path(weights_path))
    return [c for c in candidates if os.path.isfile(c)]


def find_potentials(args: argparse.Namespace, loaded, opt_options: Optional[dict]) -> Potentials:
    """The potentials to count: --potentials FILE, else those beside --weights (training's or
    convert-official's file, or the release file's own), else -opt's network_potential."""
    if args.potentials:
        module, options, origin = _potentials_from_file(args.potentials, '--potentials', opt_options)
        return Potentials(module, f'--potentials {args.potentials} (options from {origin})', options)
    if loaded is not None:
        for path in potentials_beside(loaded.weights.path):
            try:
                module, options, origin = _potentials_from_file(path, 'potentials', opt_options)
            except (CheckpointError, OptionError) as e:  # not asked for by name: say so and go on
                return Potentials(None, f'{path} is beside the weights but unusable ({e})')
            return Potentials(module, f'{path}, beside the weights (options from {origin})', options)
        released = loaded.weights.extra.get('potentials')
        if released is not None:
            options = released['baryir_config']
            module = _build_potentials(options, f'--weights {loaded.weights.path}', released['params'])
            return Potentials(module, f'the release file {loaded.weights.path}', options)
    if opt_options is not None:
        return Potentials(_build_potentials(opt_options, f'-opt {args.opt} network_potential'),
                          f'-opt {args.opt} (network_potential; freshly built, no weights needed to count)',
                          opt_options)
    where = []
    if loaded is not None:
        where.append(f'beside {loaded.weights.path}')
    if args.opt:
        where.append(f'in -opt {args.opt}')
    return Potentials(None, f'none found ({" or ".join(where) or "no source given"}); give --potentials FILE')


def count_potentials(pots: Potentials, latent: tuple) -> None:
    """Parameters and MACs of the potentials for one latent ``(C, h, w)`` of the network (their own
    training crop's latent when they accept only that)."""
    import torch

    if pots.module is None:
        return
    module = pots.module
    pots.parameters = sum(p.numel() for p in module.parameters())
    channels, h, w = latent
    notes = []
    if module.in_channels != channels:
        notes.append(f'their width {module.in_channels} is not the network latent\'s {channels}')
        channels = module.in_channels
    if module.latent_size is not None and (h, w) != (module.latent_size,) * 2:
        crop = module.latent_stride * module.latent_size
        notes.append(f'built for {crop}x{crop} crops (pool_size none), they '
                     f'accept only a {module.latent_size}x{module.latent_size} latent, not {h}x{w}')
        h = w = module.latent_size
    param = next(module.parameters())
    z = torch.zeros(1, channels, h, w, device=param.device, dtype=param.dtype)
    pots.macs = count_macs(module, (z,)).total
    pots.latent = (channels, h, w)
    pots.note = '; '.join(notes)


# --------------------------------------------------------------------------------------------------
# latency and memory
def _sync(device) -> None:
    import torch

    if str(device).startswith('cuda'):
        torch.cuda.synchronize(device)


def time_forwards(fn: Callable[[], Any], device, warmup: int, runs: int) -> dict:
    """Median, min and max seconds of ``runs`` calls of ``fn`` after ``warmup`` untimed ones."""
    import torch

    seconds = []
    with torch.no_grad():
        for i in range(warmup + runs):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                seconds.append(time.perf_counter() - start)
    return {'median_s': statistics.median(seconds), 'min_s': min(seconds), 'max_s': max(seconds),
            'runs': runs, 'warmup': warmup, 'seconds': seconds}


def cuda_peak_memory(net, x, device) -> dict:
    import torch

    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        net(x)
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {'method': 'torch.cuda.max_memory_allocated after reset_peak_memory_stats (tensors only, no CUDA '
                      'context or cached blocks)',
            'before_mib': before / 2 ** 20, 'peak_mib': peak / 2 ** 20, 'forward_mib': (peak - before) / 2 ** 20,
            'bound': 'exact'}


def _rss_bytes() -> Optional[int]:
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except (OSError, ValueError, IndexError):
        return None


def _hiwater_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == 'darwin' else peak * 1024  # bytes on macOS, KiB on Linux


def memory_probe_main() -> None:
    """The fresh process of :func:`cpu_peak_memory`: build the network from the options on stdin, run one
    forward, print the resident-memory figures as one JSON line."""
    import torch

    from ..inference.weights import build_network

    spec = json.loads(sys.stdin.read())
    torch.set_num_threads(spec['threads'])
    net = build_network(spec['options'], 'the memory probe').eval().requires_grad_(False)
    x = torch.rand(1, spec['channels'], *spec['size'])
    gc.collect()
    before, hiwater_before = _rss_bytes(), _hiwater_bytes()
    with torch.no_grad():
        net(x)
    print(json.dumps({'before': before, 'hiwater_before': hiwater_before, 'hiwater': _hiwater_bytes()}))


def cpu_peak_memory(options: dict, channels: int, size: tuple, threads: int) -> dict:
    """One forward in a fresh process (see the module docstring); weights are not needed for its memory."""
    import baryir_plugin

    method = ('resident set of a fresh process that builds the network and runs one forward: its high-water mark '
              '(ru_maxrss, with torch and the weights) and the part above its resident set just before the forward')
    root = os.path.dirname(os.path.dirname(os.path.abspath(baryir_plugin.__file__)))
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(p for p in (root, os.environ.get('PYTHONPATH')) if p)}
    env.pop('BARYIR_DEBUG', None)
    spec = json.dumps({'options': options, 'channels': channels, 'size': list(size), 'threads': threads})
    code = 'from baryir_plugin.analysis.complexity import memory_probe_main; memory_probe_main()'
    proc = subprocess.run([sys.executable, '-c', code], input=spec, capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        why = (proc.stderr.strip().splitlines() or [f'exit status {proc.returncode}'])[-1]
        return {'method': method, 'error': f'the probe process failed (exit status {proc.returncode}: {why})'}
    got = json.loads(lines[-1])
    if got['before'] is None:
        return {'method': method, 'error': 'the resident set is not readable here (/proc/self/statm)'}
    mib = 2 ** 20
    result = {'method': method, 'before_mib': got['before'] / mib, 'peak_mib': got['hiwater'] / mib}
    if got['hiwater'] > got['hiwater_before']:
        result.update(forward_mib=(got['hiwater'] - got['before']) / mib, bound='exact')
    else:  # building the network already reached a higher peak than the forward did
        result.update(forward_mib=(got['hiwater_before'] - got['before']) / mib, bound='at most')
    return result


# --------------------------------------------------------------------------------------------------
# the report
@dataclass
class Report:
    network: str
    options: dict
    size: tuple
    padded: tuple
    device: str
    machine: str
    groups: list[Group]
    parameters: int
    macs: MacCount
    outside_groups: int
    potentials: Potentials
    latency: Optional[dict] = None
    bary_map_latency: Optional[dict] = None
    latent: Optional[tuple] = None
    memory: Optional[dict] = None
    is_baryir: bool = False
    channels: int = 3

    def to_json(self) -> dict:
        pots = self.potentials
        return {
            'machine': self.machine, 'device': self.device, 'network': self.network, 'options': self.options,
            'input': {'shape': [1, self.channels, *self.size], 'padded': list(self.padded)},
            'parameters': {'total': self.parameters,
                           'groups': [{'name': g.name, 'modules': g.modules, 'parameters': g.parameters,
                                       'present': g.present} for g in self.groups]},
            'macs': {'convention': MAC_CONVENTION, 'total': self.macs.total,
                     'groups': {g.name: g.macs for g in self.groups}, 'outside_groups': self.outside_groups,
                     'by_module': self.macs.by_module, 'by_operator': self.macs.by_operator,
                     'not_counted': self.macs.uncounted, 'uncalled_modules': self.macs.uncalled_modules},
            'potentials': {'source': pots.source, 'options': pots.options, 'parameters': pots.parameters,
                           'macs': pots.macs, 'latent': list(pots.latent) if pots.latent else None,
                           'note': pots.note},
            'latency': self.latency, 'bary_map_latency': self.bary_map_latency,
            'bary_map_latent': list(self.latent) if self.latent else None,
            'memory': self.memory,
            'journal': JOURNAL if self.is_baryir else None,
        }


MAC_CONVENTION = ('mmengine FlopAnalyzer: one multiply-accumulate = 1 (convolution, matmul, einsum, '
                  'scaled-dot-product attention); layer_norm = 5 per element; the operators under not_counted add '
                  'nothing. The convention that counts multiplications and additions apart gives about 2x.')


def _m(n: float) -> str:
    return f'{n / 1e6:.2f} M'


def _g(n: Optional[float]) -> str:
    """A count with its unit: 1.23 G, 45.6 M, 7.8 k."""
    if n is None:
        return '-'
    for scale, unit in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if abs(n) >= scale:
            return f'{n / scale:.2f} {unit}'
    return f'{n:.0f}'


def _s(x: Optional[float]) -> str:
    if x is None:
        return '-'
    return f'{x * 1e3:.1f} ms' if x < 1 else f'{x:.3f} s'


def _pct(part: Optional[float], whole: float) -> str:
    return '-' if part is None or not whole else f'{100 * part / whole:.1f}'


def _modules_text(modules: Sequence[str]) -> str:
    return ', '.join(modules) if len(modules) <= 4 else f'{", ".join(modules[:2])}, ... {modules[-1]} ({len(modules)})'


def format_report(r: Report) -> str:
    c = r.channels
    pad = '' if tuple(r.padded) == tuple(r.size) else f' (padded to {r.padded[0]}x{r.padded[1]})'
    lines = [f'## {r.options["type"]}: input 1x{c}x{r.size[0]}x{r.size[1]}{pad} on {r.device}', '',
             f'machine: {r.machine}', f'network: {r.network}', f'potentials: {r.potentials.source}', '',
             '| group | modules | parameters | % | MACs | % |', '|---|---|--:|--:|--:|--:|']
    for g in r.groups:
        if not g.present:
            lines.append(f'| {g.name} | (not built) | 0 | 0.0 | - | - |')
            continue
        lines.append(f'| {g.name} | {_modules_text(g.modules)} | {g.parameters:,} | {_pct(g.parameters, r.parameters)} '
                     f'| {_g(g.macs)} | {_pct(g.macs, r.macs.total)} |')
    if r.outside_groups:
        lines.append(f'| {TOP_LEVEL} | the forward itself | 0 | 0.0 | {_g(r.outside_groups)} | '
                     f'{_pct(r.outside_groups, r.macs.total)} |')
    lines.append(f'| **network total** | | **{r.parameters:,}** | 100.0 | **{_g(r.macs.total)}** | 100.0 |')
    pots = r.potentials
    if pots.module is not None:
        at = f' at a {pots.latent[1]}x{pots.latent[2]} latent' if pots.latent else ''
        lines.append(f'| potentials (training only) | {pots.module.num_potentials} branches | {pots.parameters:,} | '
                     f'- | {_g(pots.macs)}{at} | - |')
        lines.append(f'| network + potentials (training) | | {r.parameters + pots.parameters:,} | | | |')
    lines.append('')
    ops = ', '.join(f'{op} {_g(n)}' for op, n in sorted(r.macs.by_operator.items(), key=lambda kv: -kv[1]))
    lines.append(f'MACs: {MAC_CONVENTION} Counted by operator: {ops}.')
    if r.macs.uncounted:
        parts = []
        for op, u in r.macs.uncounted.items():
            el = '' if u['output_elements'] is None else f' ({_g(u["output_elements"])} elements out)'
            parts.append(f'{op} x{u["calls"]}{el}')
        lines.append(f'Not counted by mmengine (no rule for these operators): {"; ".join(parts)}.')
    else:
        lines.append('Not counted by mmengine: nothing (every operator had a rule or is a view).')
    if r.macs.uncalled_modules:
        lines.append(f'Modules never called in the forward (no MACs): {", ".join(r.macs.uncalled_modules)}.')
    if pots.note:
        lines.append(f'Potentials: {pots.note}.')
    lines.append('')
    if r.latency is None:
        lines.append('Latency and peak memory: not measured (--no-latency).')
    else:
        lat = r.latency
        head = f'latency, torch.no_grad, {lat["runs"]} run(s) after {lat["warmup"]} warm-up'
        lines += [f'| {head} | median | min | max |',
                  '|---|--:|--:|--:|',
                  f'| network, one image | {_s(lat["median_s"])} | {_s(lat["min_s"])} | {_s(lat["max_s"])} |']
        if r.bary_map_latency is not None:
            b = r.bary_map_latency
            lines.append(f'| barycenter map T alone, latent 1x{"x".join(map(str, r.latent))} | {_s(b["median_s"])} | '
                         f'{_s(b["min_s"])} | {_s(b["max_s"])} |')
        lines.append('')
        mem = r.memory or {}
        if 'error' in mem:
            lines.append(f'Peak memory of one forward: not measured: {mem["error"]}.')
        else:
            bound = '' if mem.get('bound') == 'exact' else f'{mem.get("bound")} '
            lines.append(f'Peak memory of one forward on {r.device}: {mem["peak_mib"]:,.0f} MiB, {bound}'
                         f'{mem["forward_mib"]:,.0f} MiB of it above the {mem["before_mib"]:,.0f} MiB held before the '
                         f'forward. Measured as: {mem["method"]}.')
    if r.is_baryir:
        lines += ['', *journal_lines(r)]
    return '\n'.join(lines)


def journal_lines(r: Report) -> list[str]:
    j = JOURNAL
    t = next((g for g in r.groups if g.name == 'barycenter map T'), None)
    t_params = t.parameters if t is not None else 0
    t_macs = t.macs if t is not None else None
    rest = r.parameters - t_params
    rest_macs = None if t_macs is None else r.macs.total - t_macs
    pots = r.potentials
    training = f'{_m(r.parameters + pots.parameters)}' if pots.module is not None else '- (no potentials found)'
    if r.latency is not None and r.bary_map_latency is not None:
        seconds = (f'{_s(r.latency["median_s"] - r.bary_map_latency["median_s"])} + '
                   f'{_s(r.bary_map_latency["median_s"])} (T) on {r.device}')
    elif r.latency is not None:
        seconds = f'{_s(r.latency["median_s"])} on {r.device}'
    else:
        seconds = '-'
    return [f'| compared with the {j["source"]} | journal | this network, {r.size[0]}x{r.size[1]} |',
            '|---|--:|--:|',
            f'| parameters at inference: rest + T | {_m(j["parameters_backbone"])} + {_m(j["parameters_bary_map"])} = '
            f'{_m(j["parameters_inference"])} | {_m(rest)} + {_m(t_params)} = {_m(r.parameters)} |',
            f'| parameters in training (+ potentials) | {_m(j["parameters_training"])} | {training} |',
            f'| FLOPs: rest + T | {_g(j["flops_backbone"])} + {_g(j["flops_bary_map"])} | '
            f'{_g(rest_macs)} + {_g(t_macs)} MACs |',
            f'| time: rest + T | {j["seconds_backbone"]} s + {j["seconds_bary_map"]} s | {seconds} |']


# --------------------------------------------------------------------------------------------------
# the command
def _input_channels(options: dict) -> int:
    for key in ('in_channels', 'num_in_ch', 'in_chans'):
        if isinstance(options.get(key), int):
            return options[key]
    return 3


def _optional_potential_options(opt: Optional[str]) -> Optional[dict]:
    from ..inference.weights import options_from_file

    if opt is None:
        return None
    try:
        return options_from_file(opt, key='network_potential')
    except OptionError:  # the file itself was read already for network_g: it has no network_potential
        return None


def run(args: argparse.Namespace) -> int:
    import torch

    from ..inference.weights import build_network, load_network, options_from_file
    from .machine import check_device, machine_line

    if not args.opt and not args.weights:
        raise UsageError('give the network: -opt FILE.yml (its network_g) or --weights CKPT (a .pth or release file).')
    h, w = args.size
    if h < 1 or w < 1:
        raise UsageError(f'--size {h} {w}: give a positive height and width in pixels, e.g. --size 256 256.')
    device = check_device(args.device)
    if args.json and os.path.isdir(args.json):
        raise UsageError(f'--json {args.json} is a folder; give a file name, e.g. --json {args.json}/complexity.json.')
    if args.json and os.path.exists(args.json):
        for flag in ('opt', 'weights', 'potentials'):
            given = getattr(args, flag, None)
            if given and os.path.exists(given) and os.path.samefile(given, args.json):
                raise UsageError(f'--json {args.json} is the --{flag} file; write the report elsewhere.')
        if os.path.splitext(args.json)[1].lower() != '.json':
            raise UsageError(f'--json {args.json} exists and is not a .json file; give a new file name.')

    loaded = None
    if args.weights:
        loaded = load_network(args.weights, opt=args.opt, device='cpu', log=print)
        net, options, network = loaded.net, loaded.options, loaded.describe()
    else:
        options = options_from_file(args.opt)
        if options['type'] == 'BarycenterPotentials':
            raise OptionError(f'-opt {args.opt}: network_g is BarycenterPotentials; give the restoration network '
                              'there (the potentials belong under network_potential).')
        net = build_network(options, f'-opt {args.opt}').eval().requires_grad_(False)
        network = (f'{options["type"]} ({sum(p.numel() for p in net.parameters()):,} parameters) from -opt {args.opt} '
                   '(network_g, freshly built: counts and timings need no trained weights)')
    from ..archs.baryir_arch import BaryIR

    is_baryir = isinstance(net, BaryIR)
    groups, total = count_parameters(net)
    channels = _input_channels(options)
    padded = (h, w)
    if is_baryir:
        m = net.pad_multiple
        padded = (h + (-h % m), w + (-w % m))
    pots = Potentials(None, 'not applicable (not a BaryIR network)')
    latent = None
    if is_baryir:
        stride = net.latent_stride
        latent = (net.latent_channels, padded[0] // stride, padded[1] // stride)  # (8d, H/8, W/8) by default
        from ..archs.potentials_arch import options_from_network

        pot_options = _optional_potential_options(args.opt)
        if pot_options is not None:  # what BaryIRModel fills in from network_g when the file leaves it out
            pot_options = {**options_from_network(net), **pot_options}
        pots = find_potentials(args, loaded, pot_options)

    # the memory probe first: this process holds nothing but the network yet
    memory = None
    if not args.no_latency and not device.startswith('cuda'):
        memory = cpu_peak_memory(options, channels, (h, w), torch.get_num_threads())

    net = net.to(device)
    param = next(net.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    x = torch.rand(1, channels, h, w, device=device, dtype=dtype)
    macs = count_macs(net, (x,))
    outside = group_macs(groups, macs)
    if pots.module is not None:
        pots.module.to(device)
        count_potentials(pots, latent)

    latency = bary_latency = None
    if not args.no_latency:
        latency = time_forwards(lambda: net(x), device, args.warmup, args.runs)
        if is_baryir and getattr(net, 'bary_map', None) is not None:
            z = torch.randn(1, *latent, device=device, dtype=dtype)
            bary_latency = time_forwards(lambda: net.bary_map(z), device, args.warmup, args.runs)
        if device.startswith('cuda'):
            memory = cuda_peak_memory(net, x, device)

    report = Report(network, options, (h, w), padded, device, machine_line(device), groups, total, macs, outside, pots,
                    latency, bary_latency, latent, memory, is_baryir, channels)
    print(format_report(report))
    if args.json:
        from ..models.validation_report import write_json

        write_json(args.json, report.to_json())
        print(f'\nwrote {args.json}')
    return 0


def add_command(sub) -> None:
    from baryir_plugin.cli import add_debug_flag
    from baryir_plugin.data.checks import non_negative_int, positive_int

    parser = sub.add_parser(
        'complexity', help='parameters, MACs, latency and peak memory of a network, by module group',
        description='Parameters and multiply-accumulates (mmengine) of a restoration network per module group '
                    '(BaryIR: encoder, barycenter map T, latent fusion, residual decoder, main decoder) and of '
                    'the barycenter potentials; latency and peak memory of one forward; the BaryIR journal\'s '
                    'figures beside them.')
    parser.add_argument('-opt', '--opt', dest='opt', default=None, metavar='FILE.yml',
                        help='option file: network_g is counted (and network_potential, when present)')
    parser.add_argument('--weights', default=None, metavar='CKPT',
                        help='weights file (BasicSR .pth, state dict or the official release); with -opt, the '
                             'options of -opt are used')
    parser.add_argument('--potentials', default=None, metavar='FILE',
                        help='potentials file to count (default: the one beside --weights, else -opt\'s '
                             'network_potential)')
    parser.add_argument('--size', nargs=2, type=int, default=list(DEFAULT_SIZE), metavar=('H', 'W'),
                        help='input height and width in pixels (default 256 256)')
    parser.add_argument('--device', default='cpu', help='cpu, cuda or cuda:N (default cpu)')
    parser.add_argument('--warmup', type=non_negative_int, default=2, metavar='N',
                        help='untimed forwards before timing (default 2)')
    parser.add_argument('--runs', type=positive_int, default=10, metavar='N', help='timed forwards (default 10)')
    parser.add_argument('--no-latency', action='store_true',
                        help='count only: no timed forwards and no memory measurement')
    parser.add_argument('--json', default=None, metavar='FILE', help='also write every figure to this JSON file')
    add_debug_flag(parser)
    parser.set_defaults(func=run)

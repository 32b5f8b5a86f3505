#!/usr/bin/env python
"""Small-budget ablation: the same small BaryIR trained with and without the barycenter map, evaluated on
real benchmark images in and out of distribution.

Arm "with T": BaryIRModel (barycenter map, K potentials, MWB + IRC + BRO, the demo's recipe).
Arm "without T": the same network with ``embedding_mode: original`` (no barycenter map, the decoder sees
the encoder latent) trained by BasicSR's stock SRModel on the L1 loss alone. Both arms share the data
(the demo's synthetic all-in-one set built from scikit-image photos, the sources chosen with --sources),
the seed, the optimizer, the schedule and the number of iterations. Both are then evaluated (--eval)
either with options/test_baryir_shared_data.yml on a folder of real benchmark images (--data-root):
Rain100L and CBSD68 sigma 15/25/50 (the papers' in-distribution sets), Rain100H, CBSD68 sigma 60/75,
Kodak24, McMaster and RNI15 (out of distribution; RNI15 has no ground truth: NIQE/PIQE only); or with
options/test_baryir_demo.yml on the demo's own validation sets, one per degradation (in distribution),
which is the only choice that covers motion blur and low light.

A few minutes of CPU training is far from the papers' budget: the table says what this tiny setting
shows (does T help or hurt at equal cost), not what the full model reaches.

    python scripts/study_barycenter_map.py --data-root ../data --iters 1000
    python scripts/study_barycenter_map.py --eval demo --sources noise rain haze blur lowlight --out study_5src
    python scripts/study_barycenter_map.py --data-root ../data --iters 50 --out study_smoke   # smoke run
"""
from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from baryir_plugin.errors import BaryIRError, DataError, SetupError, UsageError

PROG = 'scripts/study_barycenter_map.py'
REPO = Path(__file__).resolve().parents[1]
TRAIN_TEMPLATES = {'restormer': REPO / 'options' / 'train_baryir_demo.yml',
                   'promptir': REPO / 'options' / 'train_baryir_promptir_demo.yml',
                   'nafnet': REPO / 'options' / 'train_baryir_nafnet_demo.yml'}
TEST_TEMPLATES = {'shared': REPO / 'options' / 'test_baryir_shared_data.yml',
                  'demo': REPO / 'options' / 'test_baryir_demo.yml'}
SOURCES = ('noise', 'rain', 'haze', 'blur', 'lowlight')
IN_DISTRIBUTION = ('Rain100L', 'CBSD68_sigma15', 'CBSD68_sigma25', 'CBSD68_sigma50',
                   'demo_noise', 'demo_rain', 'demo_haze', 'demo_blur', 'demo_lowlight')


def _console(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        raise SetupError(f'{name!r} is not installed beside {sys.executable}; run `pip install -e .` first.')
    return str(path)


def _shown(cmd: list[str]) -> str:
    """A child command as the user would type it (``python`` for this interpreter, the console name alone)."""
    words = ['python' if cmd[0] == sys.executable else Path(cmd[0]).name] + [str(c) for c in cmd[1:]]
    return shlex.join(words)


def child_failed(cmd: list[str], status: int, log: Path | None = None, note: str = '') -> BaryIRError:
    """The one error of this script for a child command that failed; the child's own error line, which
    says what is wrong, has been printed above it."""
    where = f'; its whole output is in {log}' if log is not None else ''
    how = f'was killed by signal {-status}' if status < 0 else f'failed with exit status {status}'
    return BaryIRError(f'`{_shown(cmd)}` {how}: its own error line above says why{note}{where}. '
                       'Fix that and run the study again.')


def _run(cmd: list[str], cwd: Path, log: Path) -> float:
    """Run a child command with its output in ``log``; on failure print the child's own error line (or, if
    it printed none, the end of its output) and raise one error naming the command."""
    start = time.perf_counter()
    with open(log, 'w') as f:
        proc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        lines = log.read_text(errors='replace').splitlines()
        own = [ln for ln in lines if re.match(r'^[\w./ -]+: (internal )?error: ', ln)]
        sys.stdout.flush()
        print('\n'.join(own or lines[-25:]), file=sys.stderr, flush=True)
        raise child_failed(cmd, proc.returncode, log)
    return time.perf_counter() - start


def check_sources(sources: list[str]) -> None:
    """--sources: names of SOURCES, each once, in that order."""
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        from baryir_plugin.errors import did_you_mean
        raise UsageError(f'--sources: unknown {unknown}{did_you_mean(unknown[0], SOURCES)}; choose from '
                         f'{" ".join(SOURCES)}.')
    ordered = [s for s in SOURCES if s in sources]
    if list(sources) != ordered:
        raise UsageError(f'--sources {" ".join(sources)}: give each source once, in the order {" ".join(SOURCES)} '
                         f'(here: --sources {" ".join(ordered)}).')


def train_options(name: str, with_t: bool, sources: list[str], iters: int, data_dir: str, dim: int,
                  backbone: str = 'restormer') -> dict:
    """The backbone's demo recipe restricted to ``sources``; without T: SRModel and ``embedding_mode:
    original``. ``dim`` sets the width of the default (Restormer) backbone only."""
    opt = yaml.safe_load(TRAIN_TEMPLATES[backbone].read_text())
    opt['name'] = name
    train = opt['datasets']['train']
    kept = [s for s in train['sources'] if s['name'] in sources]
    if [s['name'] for s in kept] != list(sources):
        raise UsageError(f'--sources must be taken from {SOURCES}, in that order; got {sources}.')
    for s in kept:
        _point_at(s, data_dir)
    train['sources'] = kept
    opt['datasets'] = {'train': train}  # evaluation happens afterwards on the real sets
    opt.pop('val', None)
    if backbone == 'restormer':
        opt['network_g']['dim'] = dim
    opt['train']['total_iter'] = iters
    opt['train']['scheduler']['periods'] = [iters]
    opt['logger']['save_checkpoint_freq'] = iters
    if with_t:
        opt['network_potential']['num_potentials'] = len(kept)
        opt['network_potential'].pop('in_channels', None)  # follows network_g
    else:
        opt['model_type'] = 'SRModel'
        opt['network_g']['embedding_mode'] = 'original'
        opt.pop('network_potential')
        for key in ('optim_potential', 'mwb_opt', 'potential_opt', 'irc_opt', 'bro_opt', 'barycenter_weight', 'gamma',
                    'lambda_mode', 'potential_iters', 'potential_step', 'gather_embeddings'):
            opt['train'].pop(key, None)
    return opt


def _point_at(dataset: dict, data_dir: str) -> None:
    """Rewrite a demo dataset entry's folders from the default datasets/demo to ``data_dir``."""
    for key in ('dataroot_gt', 'dataroot_lq'):
        if key in dataset:
            dataset[key] = dataset[key].replace('datasets/demo', data_dir, 1)


def test_options(name: str, train_opt: dict, checkpoint: str, sets: list[str] | None = None,
                 evaluation: str = 'shared', data_dir: str = 'datasets/demo') -> dict:
    """The --eval test file with the trained network (and only ``sets``, if given). The demo's file gets the
    shared one's report settings (per-image CSV/JSON, the inputs' own scores) and ``data_dir``."""
    opt = yaml.safe_load(TEST_TEMPLATES[evaluation].read_text())
    opt['name'] = name
    if evaluation == 'demo':
        for dataset in opt['datasets'].values():
            _point_at(dataset, data_dir)
        opt['val'] = {**opt['val'], 'save_img': False, 'report': True, 'input_metrics': True}
    if sets:
        check_sets(sets, evaluation)
        opt['datasets'] = {k: d for k, d in opt['datasets'].items() if d['name'] in sets}
        average = opt['val'].get('average')
        if isinstance(average, list):  # average over the chosen sets the file averages, if any
            opt['val']['average'] = [n for n in average if n in sets] or False
    opt['network_g'] = copy.deepcopy(train_opt['network_g'])
    opt['path']['pretrain_network_g'] = checkpoint
    return opt


def check_sets(sets: list[str] | None, evaluation: str) -> None:
    """--sets: names of datasets of the --eval test file."""
    if not sets:
        return
    opt = yaml.safe_load(TEST_TEMPLATES[evaluation].read_text())
    known = [d['name'] for d in opt['datasets'].values()]
    unknown = sorted(set(sets) - set(known))
    if unknown:
        raise UsageError(f'--sets: unknown {unknown} for --eval {evaluation}; choose from {" ".join(known)}.')


def load_summaries(results: Path) -> dict[str, dict]:
    """Each set's summary JSON (not the average over sets: the table is per set)."""
    return {p.stem: json.loads(p.read_text()) for p in sorted((results / 'metrics').glob('*.json'))
            if p.stem != 'average'}


def table(arms: dict[str, dict[str, dict]], evaluation: str = 'shared') -> str:
    """Markdown table: per set, the input's score and each arm's (PSNR/SSIM; NIQE/PIQE where no GT).
    In-distribution sets first, each group in the order of the --eval test file."""
    names = list(arms)
    first = arms[names[0]]
    order = [d['name'] for d in yaml.safe_load(TEST_TEMPLATES[evaluation].read_text())['datasets'].values()]
    rank = {name: (name not in IN_DISTRIBUTION, order.index(name) if name in order else len(order)) for name in first}
    lines = ['| set | split | metric | input | ' + ' | '.join(names) + ' |',
             '|---|---|---|---|' + '---|' * len(names)]
    for dataset in sorted(first, key=rank.get):
        summary = first[dataset]
        split = 'in' if dataset in IN_DISTRIBUTION else 'out'
        for metric, entry in summary['metrics'].items():
            if 'mean' not in entry or metric.endswith('_y'):
                continue
            cells = [f'{arms[a][dataset]["metrics"][metric]["mean"]:.3f}' if metric.startswith('ssim') else
                     f'{arms[a][dataset]["metrics"][metric]["mean"]:.2f}' for a in names]
            inp = entry.get('input_mean')
            inp_s = '' if inp is None else (f'{inp:.3f}' if metric.startswith('ssim') else f'{inp:.2f}')
            better = 'lower' if entry.get('better') == 'lower' else 'higher'
            lines.append(f'| {dataset} | {split} | {metric} ({better} better) | {inp_s} | ' + ' | '.join(cells) + ' |')
    lines += _average_rows(arms, [d for d in first if d in IN_DISTRIBUTION])
    return '\n'.join(lines)


def _average_rows(arms: dict[str, dict[str, dict]], sets: list[str]) -> list[str]:
    """The mean over the in-distribution sets of each set's mean (the all-in-one "Average" column), for
    the metrics every one of those sets has, the inputs' beside it."""
    if len(sets) < 2:
        return []
    names = list(arms)
    first = arms[names[0]]
    metrics = [m for m in first[sets[0]]['metrics'] if not m.endswith('_y')
               and all('mean' in first[d]['metrics'].get(m, {}) for d in sets)]
    rows = []
    for metric in metrics:
        digits = 3 if metric.startswith('ssim') else 2

        def mean(values):
            return f'{sum(values) / len(values):.{digits}f}'

        inputs = [first[d]['metrics'][metric].get('input_mean') for d in sets]
        inp = '' if None in inputs else mean(inputs)
        cells = [mean([arms[a][d]['metrics'][metric]['mean'] for d in sets]) for a in names]
        better = 'lower' if first[sets[0]]['metrics'][metric].get('better') == 'lower' else 'higher'
        rows.append(f'| average of {len(sets)} | in | {metric} ({better} better) | {inp} | ' + ' | '.join(cells) + ' |')
    return rows


def parse_args(argv: list[str] | None = None):
    from baryir_plugin.analysis.flags import check_network, positive_int, tool_parser

    p = tool_parser(PROG, __doc__)
    p.add_argument('--eval', choices=sorted(TEST_TEMPLATES), default='shared',
                   help='shared: real benchmark images under --data-root (default); demo: the demo validation sets')
    p.add_argument('--data-root', help='with --eval shared: folder with CBSD68, Kodak24, McMaster, RNI15, '
                   'Rain100L, Rain100H (see docs/evaluation.md)')
    p.add_argument('--iters', type=positive_int, default=1000, help='training iterations of each arm (default 1000)')
    p.add_argument('--dim', type=positive_int, default=8, help='BaryIR width (even; default 8, the demo network) '
                   'of the restormer backbone')
    p.add_argument('--backbones', nargs='+', choices=sorted(TRAIN_TEMPLATES), default=['restormer'],
                   help='backbones to train with and without T, each from its demo recipe (default: restormer)')
    p.add_argument('--sources', nargs='+', default=['noise', 'rain', 'haze'],
                   help=f'training sources of the demo set, in the order {" ".join(SOURCES)} (default: the '
                   '3-degradation setting noise rain haze)')
    p.add_argument('--demo-data', default='datasets/demo', help='demo data folder (built if missing)')
    p.add_argument('--sets', nargs='+', default=None,
                   help='evaluate only these sets of the --eval test file (default: all)')
    p.add_argument('--out', default='.', help='working folder: experiments/ and results/ go here')
    args = p.parse_args(argv)

    check_sources(args.sources)
    check_sets(args.sets, args.eval)
    check_network(args.dim)
    if args.eval == 'shared':
        if args.data_root is None:
            raise UsageError('--eval shared needs --data-root (the folder of real benchmark images); '
                             'or pass --eval demo to evaluate on the demo validation sets.')
        if not Path(args.data_root).is_dir():
            raise DataError(f'--data-root {args.data_root!r} is not a folder; give the folder of the real benchmark '
                            'images (see docs/evaluation.md), or pass --eval demo.')
    for flag, value, what in (('--out', args.out, 'the working folder'),
                              ('--demo-data', args.demo_data, 'the demo data folder (built if missing)')):
        path = Path(value)
        blocked = next((q for q in (path, *path.parents) if q.exists() and not q.is_dir()), None)
        if blocked is not None:
            raise UsageError(f'{flag} {value}: {blocked} is a file, not a folder; give a folder for {what}.')
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_root = Path(args.data_root).resolve() if args.eval == 'shared' else None
    demo = Path(args.demo_data)
    demo = demo if demo.is_absolute() else (Path.cwd() / demo)
    if not (demo / 'train').is_dir():
        print(f'[study] building the demo data in {demo}', flush=True)
        cmd = [sys.executable, str(REPO / 'scripts' / 'make_demo_data.py'), '--out', str(demo)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
        if proc.returncode != 0:
            raise child_failed(cmd, proc.returncode, note=' (its --out is this --demo-data)')
    basicsr = _console('basicsr')
    opts_dir = out / 'study_options'
    opts_dir.mkdir(exist_ok=True)

    arms = {}
    for backbone in dict.fromkeys(args.backbones):
        tag = '' if args.backbones == ['restormer'] else f'{backbone} '
        suffix = '' if args.backbones == ['restormer'] else f'_{backbone}'
        arms[f'{tag}with T'] = (f'study_with_T{suffix}', True, backbone)
        arms[f'{tag}without T'] = (f'study_without_T{suffix}', False, backbone)
    summaries, timing = {}, {}
    for label, (name, with_t, backbone) in arms.items():
        topt = train_options(name, with_t, args.sources, args.iters, str(demo), args.dim, backbone)
        tpath = opts_dir / f'train_{name}.yml'
        tpath.write_text(yaml.safe_dump(topt, sort_keys=False))
        print(f'[study] training {label}: {args.iters} iterations ({tpath})', flush=True)
        timing[label] = {'train_s': _run([basicsr, 'train', '-opt', str(tpath)], out, opts_dir / f'{name}_train.out')}
        ckpt = out / 'experiments' / name / 'models' / 'net_g_latest.pth'
        eopt = test_options(f'{name}_eval', topt, str(ckpt), args.sets, args.eval, str(demo))
        epath = opts_dir / f'test_{name}.yml'
        epath.write_text(yaml.safe_dump(eopt, sort_keys=False))
        print(f'[study] evaluating {label} on {data_root or demo / "val"}', flush=True)
        extra = ['--data-root', str(data_root)] if data_root else []
        timing[label]['eval_s'] = _run([basicsr, 'test', '-opt', str(epath)] + extra, out,
                                       opts_dir / f'{name}_test.out')
        summaries[label] = load_summaries(out / 'results' / f'{name}_eval')

    from baryir_plugin.analysis import machine_line  # the benchmarks' machine line
    machine = machine_line('cpu')
    text = (f'BaryIR backbones {args.backbones} (restormer dim {args.dim}), sources {args.sources}, {args.iters} '
            'iterations per arm, '
            f'evaluated on {args.eval}, machine: {machine}\n'
            + ''.join(f'{k}: train {v["train_s"]:.0f} s, eval {v["eval_s"]:.0f} s\n' for k, v in timing.items())
            + '\n' + table(summaries, args.eval) + '\n')
    print(text)
    (out / 'study_barycenter_map.md').write_text(text)
    (out / 'study_barycenter_map.json').write_text(json.dumps({'args': vars(args), 'timing': timing,
                                                               'summaries': summaries}, indent=2))
    print(f'[study] wrote {out / "study_barycenter_map.md"} and .json')
    return 0


if __name__ == '__main__':
    from baryir_plugin.errors import guarded_main
    sys.exit(guarded_main(PROG, main))

"""The GPU check behind scripts/gpu_check.py: one command, one table, one JSON file.

Checks, in order (each one a row group of the table; a failing check is reported, the others still run):
  parity    the reference fixture's outputs reproduced on the device (TF32 off, then with TF32 as
            training would run it);
  steps     median step time and peak memory of the training modes at the default config, batch 3 and 8;
  kernels   the share of device time in convolution and matrix-multiply kernels (torch.profiler);
  ddp       ``basicsr train --launcher pytorch`` under torchrun, world size 1 (NCCL on a GPU, gloo on a CPU);
  bf16      bf16 vs float32 losses over the same iterations, batches and initial weights;
  demo      the demo recipe (options/train_baryir_demo.yml, 1,000 iterations) in float32, bf16 and fp16
            through ``basicsr train``: the final validation average of each, and each precision's
            per-seed difference from float32 against 0.1 dB (a 95% interval: within, beyond, undecided);
  infer     ``baryir infer``'s restoration of a 2048 x 2048 image with the default network: whole, exact
            streamed tiles and bf16, seconds per megapixel, peak memory, and the tiles' difference from whole.

``quick`` shrinks every check to a tiny network (the CPU self-test of the script).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .machine import machine_line
from .train_benchmark import BenchConfig, build_model, random_batches, run_mode

STEP_MODES = ['base', 'unguarded', 'cl', 'bf16', 'bf16+cl', 'fp16+cl', 'bf16+cl+reuse', 'bf16+cl+reuse+unguarded',
              'ckpt', 'bf16+cl+ckpt', 'bf16+cl+compile', 'bf16+cl+reuse+compile']
QUICK_MODES = ['base', 'cl', 'bf16+cl+reuse', 'ckpt', 'compile']
CHECKS = ('parity', 'steps', 'kernels', 'ddp', 'bf16', 'demo', 'infer')
REPO = Path(__file__).resolve().parents[2]
_CONV = ('conv', 'cudnn', 'implicit_gemm', 'winograd', 'dgrad', 'wgrad', 'fprop', 'mkldnn_convolution')
_MATMUL = ('gemm', 'matmul', 'bmm', 'cutlass', 'xmma', 'addmm', 'mm_', 'aten::mm')


def _config(quick: bool, device: str, batch: int = 3) -> BenchConfig:
    if quick:
        return BenchConfig(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, num_bary_blocks=1, batch=batch,
                           crop=32, device=device)
    return BenchConfig(batch=batch, device=device)


def check_parity(fixture: Path, device: str) -> list[dict]:
    """Max abs error of the converted reference checkpoint's outputs on ``device`` (fp32, TF32 off and on)."""
    from baryir_plugin.archs import BaryIR, BarycenterPotentials
    from baryir_plugin.official import convert_official

    try:
        expected = torch.load(fixture / 'expected_outputs.pt', weights_only=True)
        net_g, net_pot = convert_official(str(fixture / 'official_format_checkpoint.pt'))
    except Exception as e:  # noqa: BLE001 (a broken fixture is this check's result, named, not a crash)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return [{'check': 'parity', 'ok': False,
                 'error': f'cannot read the reference fixture in {fixture} ({type(e).__name__}: {first[:200]}); '
                          'point --fixture at a folder holding expected_outputs.pt and official_format_checkpoint.pt'}]
    net = BaryIR(**{k: v for k, v in net_g['baryir_config'].items() if k != 'type'}).eval().to(device)
    net.load_state_dict(net_g['params'])
    pots = BarycenterPotentials(**{k: v for k, v in net_pot['baryir_config'].items() if k != 'type'}).to(device)
    pots.load_state_dict(net_pot['params'])
    rows = []
    for tf32 in (False, True):
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        try:
            with torch.no_grad():
                outs = net(expected['input'].to(device), return_latents=True)
                scores = pots(expected['potential_inputs'].to(device),
                              torch.arange(len(expected['potential_outputs']), device=device))
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
        errors = {name: float((t.cpu() - expected[name]).abs().max())
                  for name, t in zip(('restored', 'z', 'z_bary', 'residual'), outs)}
        errors['potentials'] = float((scores.cpu() - expected['potential_outputs']).abs().max())
        rows.append({'check': 'parity', 'tf32': tf32, **errors, 'max_abs_error': max(errors.values()),
                     'ok': max(errors.values()) <= (1e-4 if not tf32 else 1e-2)})
    return rows


def check_steps(quick: bool, device: str, modes: list[str], batches=(3, 8), warmup: int = 3, iters: int = 10,
                deadline: Optional[float] = None) -> list[dict]:
    rows = []
    for batch in batches:
        config = _config(quick, device, batch)
        for mode in modes:
            if deadline is not None and time.monotonic() > deadline:
                rows.append({'check': 'steps', 'batch': batch, 'mode': mode, 'skipped': 'time budget spent'})
                continue
            if device == 'cuda':
                torch.cuda.empty_cache()
            try:
                r = run_mode(config, mode, warmup, iters)
                rows.append({'check': 'steps', 'batch': batch, **{k: r[k] for k in (
                    'mode', 'median_s', 'min_s', 'max_s', 'peak_mib', 'finite', 'compiled')}})
            except torch.cuda.OutOfMemoryError as e:  # a mode that does not fit is a result, not a crash
                rows.append({'check': 'steps', 'batch': batch, 'mode': mode, 'error': f'out of memory: {e}'[:200]})
    base = {r['batch']: r['median_s'] for r in rows if r.get('mode') == 'base' and 'median_s' in r}
    for r in rows:
        if 'median_s' in r and r['batch'] in base:
            r['x_base'] = r['median_s'] / base[r['batch']]
    return rows


def check_kernels(quick: bool, device: str, modes=('base', 'bf16+cl')) -> list[dict]:
    """Share of device (CPU: CPU) self time in convolution and matmul kernels over 3 profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for mode in modes:
        config = _config(quick, device)
        model = build_model(config, mode)
        batches = random_batches(config)
        for i in range(2):
            model.feed_data(next(batches))
            model.optimize_parameters(i + 1)
        activities = [ProfilerActivity.CUDA] if device == 'cuda' else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            for i in range(3):
                model.feed_data(next(batches))
                model.optimize_parameters(i + 3)
            if device == 'cuda':
                torch.cuda.synchronize()
        totals = {'conv': 0.0, 'matmul': 0.0, 'other': 0.0}
        for evt in prof.key_averages():
            t = evt.self_device_time_total if device == 'cuda' else evt.self_cpu_time_total
            name = evt.key.lower()
            kind = 'conv' if any(k in name for k in _CONV) else 'matmul' if any(k in name for k in _MATMUL) else 'other'
            totals[kind] += t
        total = sum(totals.values()) or 1.0
        rows.append({'check': 'kernels', 'mode': mode, **{f'{k}_share': v / total for k, v in totals.items()},
                     'profiled_ms': total / 1e3})
        del model
    return rows


_DDP_YML = textwrap.dedent('''\
    name: gpu_check_ddp
    model_type: BaryIRModel
    scale: 1
    num_gpu: {num_gpu}
    manual_seed: 0
    datasets:
      train:
        name: check
        type: AllInOneDataset
        sources:
          - {{name: noise, type: GaussianNoiseDataset, dataroot_gt: {root}/train/clean, sigmas: [25]}}
          - {{name: rain, type: PairedImageDataset, dataroot_gt: {root}/train/rain/gt,
             dataroot_lq: {root}/train/rain/lq}}
        filename_tmpl: '{{}}'
        io_backend: {{type: disk}}
        gt_size: 32
        use_hflip: true
        use_rot: true
        num_worker_per_gpu: 1
        batch_size_per_gpu: 2
        dataset_enlarge_ratio: 1
    network_g: {{type: BaryIR, dim: 8, num_blocks: [1, 1, 1, 1], num_refinement_blocks: 1, num_bary_blocks: 1}}
    network_potential: {{type: BarycenterPotentials, num_potentials: 2, in_channels: 64, patch_size: 32}}
    path: {{pretrain_network_g: ~, resume_state: ~}}
    use_amp: {use_amp}
    amp_bf16: true
    train:
      optim_g: {{type: RMSprop, lr: !!float 1e-4}}
      optim_potential: {{type: RMSprop, lr: !!float 1e-4}}
      scheduler: {{type: MultiStepLR, milestones: [1000], gamma: 0.1}}
      total_iter: 6
      warmup_iter: -1
      pixel_opt: {{type: L1Loss, loss_weight: 1.0}}
    logger: {{print_freq: 2, save_checkpoint_freq: 6, use_tb_logger: false, wandb: ~}}
    ''')


def _write_tiny_data(root: Path, count: int = 4, size: int = 48) -> None:
    """Random clean images and (clean + noise, clean) pairs: enough for a few training iterations."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    for folder in ('train/clean', 'train/rain/gt', 'train/rain/lq'):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        clean = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        lq = np.clip(clean.astype(np.int16) + rng.integers(-20, 21, clean.shape), 0, 255).astype(np.uint8)
        for folder, img in (('train/clean', clean), ('train/rain/gt', clean), ('train/rain/lq', lq)):
            cv2.imwrite(str(root / folder / f'{i:03d}.png'), img)


def check_ddp(device: str, workdir: Path) -> list[dict]:
    """torchrun, world size 1, through BasicSR's train pipeline with --launcher pytorch."""
    root = workdir / 'datasets' / 'tiny'
    _write_tiny_data(root)
    yml = workdir / 'ddp.yml'
    yml.write_text(_DDP_YML.format(root=root, num_gpu=1 if device == 'cuda' else 0,
                                   use_amp='true' if device == 'cuda' else 'false'))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1', '-m', 'baryir_plugin',
           'train', '-opt', str(yml), '--launcher', 'pytorch']
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=300)
    logs = sorted((workdir / 'experiments' / 'gpu_check_ddp').glob('train_*.log'))
    log = logs[-1].read_text() if logs else ''
    ok = proc.returncode == 0 and 'End of training' in log
    backend = 'nccl' if device == 'cuda' else 'gloo'
    row = {'check': 'ddp', 'backend': backend, 'ok': ok, 'seconds': time.perf_counter() - start}
    if not ok:
        row['error'] = (proc.stderr or proc.stdout)[-1500:]
    return [row]


def check_bf16(quick: bool, device: str, iters: int = 100) -> list[dict]:
    """bf16+channels-last vs float32: l_pix and l_mwb per iteration from the same start and batches."""
    curves = {}
    for mode in ('base', 'bf16+cl'):
        config = _config(quick, device)
        torch.manual_seed(0)
        model = build_model(config, mode)
        batches = random_batches(config)
        curve = []
        for i in range(iters):
            model.feed_data(next(batches))
            model.optimize_parameters(i + 1)
            log = model.get_current_log()
            curve.append((log['l_pix'], log['l_mwb'], log.get('l_potential', 0.0)))
        curves[mode] = curve
        del model
    ref, got = curves['base'], curves['bf16+cl']
    finite = all(math.isfinite(v) for row in got for v in row)
    rel = [abs(g[0] - r[0]) / max(abs(r[0]), 1e-12) for g, r in zip(got, ref)]
    tail = max(1, iters // 10)
    return [{'check': 'bf16', 'iterations': iters, 'finite': finite,
             'l_pix_fp32_last': sum(r[0] for r in ref[-tail:]) / tail,
             'l_pix_bf16_last': sum(g[0] for g in got[-tail:]) / tail,
             'l_pix_max_rel_diff': max(rel), 'l_pix_mean_rel_diff': sum(rel) / len(rel),
             'ok': finite and max(rel[-tail:]) < 0.05}]


# Two-sided 95% quantiles of Student's t by degrees of freedom (larger df: the nearest smaller entry).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101,
         19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def paired_verdict(reference: list[float], other: list[float], bound: float = 0.1) -> dict:
    """Whether ``other`` ends within ``bound`` of ``reference`` on average, from one pair per seed.

    The per-seed differences give a mean, its standard error and a 95% interval (Student's t). ``ok`` is
    True when the interval lies inside +-bound, False when it lies wholly beyond it, and None (undecided:
    more seeds or more validation images needed) when it straddles the bound or one seed gives no spread.
    """
    if len(reference) != len(other) or not reference:
        raise ValueError(f'need one value per seed in both arms, got {len(reference)} and {len(other)}')
    diffs = [o - r for r, o in zip(reference, other)]
    n = len(diffs)
    mean = sum(diffs) / n
    out = {'diffs_db': diffs, 'diff_db': mean, 'bound_db': bound}
    if n < 2:
        return {**out, 'ok': None, 'verdict': 'undecided: one seed has no spread to judge the mean by'}
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    t = _T975[max(k for k in _T975 if k <= n - 1)]
    lo, hi = mean - t * se, mean + t * se
    out.update(sd_db=sd, se_db=se, ci95_db=[lo, hi])
    if -bound <= lo and hi <= bound:
        return {**out, 'ok': True, 'verdict': f'within {bound} dB (95% interval)'}
    if lo > bound or hi < -bound:
        return {**out, 'ok': False, 'verdict': f'beyond {bound} dB (95% interval)'}
    return {**out, 'ok': None, 'verdict': f'undecided: the 95% interval crosses +-{bound} dB; '
                                          'more seeds or more validation images narrow it'}


def check_demo(device: str, workdir: Path, iters: int = 1000, judge: bool = True,
               seeds: tuple = (10,), val_photos: Optional[list] = None) -> list[dict]:
    """The demo recipe in float32, bf16 and fp16 (same seeds and data): final validation average PSNR,
    per seed, and each precision's per-seed difference from float32 judged by :func:`paired_verdict`.

    A single seed moves the demo's average by tenths of a dB with any rounding change
    (docs/training-speed.md), and its two validation crops per set leave a spread of about 0.5 dB per
    seed: ``val_photos`` (folders of clean images, ``make_demo_data.py --val-photos``) validates on
    their centre crops instead, which cuts that spread to about 0.15 dB."""
    import re

    data = workdir / 'datasets' / 'demo'
    make = [sys.executable, str(REPO / 'scripts' / 'make_demo_data.py'), '--out', str(data)]
    if val_photos:
        make += ['--val-photos', *[str(Path(v).resolve()) for v in val_photos]]
    made = subprocess.run(make, capture_output=True, text=True, cwd=workdir)
    if made.returncode != 0:
        said = (made.stderr or made.stdout).strip().splitlines()
        raise RuntimeError(said[-1] if said else f'make_demo_data.py exited with status {made.returncode}')
    val_images = sum(len(list(gt.iterdir())) for gt in (data / 'val').glob('*/gt'))
    rows, values = [], {}
    for precision, force in (('fp32', []), ('bf16', ['use_amp=true', 'amp_bf16=true']),
                             ('fp16', ['use_amp=true', 'amp_bf16=false'])):
        for seed in seeds:
            name = f'gpu_check_demo_{precision}_{seed}'
            cmd = [sys.executable, '-m', 'baryir_plugin', 'train', '-opt',
                   str(REPO / 'options' / 'train_baryir_demo.yml'), '--force_yml', f'name={name}',
                   f'manual_seed={seed}', f'num_gpu={1 if device == "cuda" else 0}', f'train:total_iter={iters}',
                   f'val:val_freq={iters}', f'logger:save_checkpoint_freq={iters}', *force]
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=900)
            logs = sorted((workdir / 'experiments' / name).glob('train_*.log'))
            found = re.findall(r'Validation average\n\t # psnr: ([0-9.]+)', logs[-1].read_text()) if logs else []
            row = {'check': 'demo', 'precision': precision, 'seed': seed, 'iterations': iters,
                   'val_images': val_images, 'seconds': time.perf_counter() - start}
            if proc.returncode != 0 or not found:
                row.update(ok=False, error=(proc.stderr or proc.stdout)[-1500:])
            else:
                row['val_average_psnr'] = float(found[-1])
                values.setdefault(precision, []).append(row['val_average_psnr'])
            rows.append(row)
    complete = {p: v for p, v in values.items() if len(v) == len(seeds)}
    for precision in ('bf16', 'fp16'):
        if precision in complete and 'fp32' in complete:
            ref, got = complete['fp32'], complete[precision]
            row = {'check': 'demo', 'precision': precision, 'seeds': list(seeds), 'mean_psnr': sum(got) / len(got),
                   'fp32_mean_psnr': sum(ref) / len(ref), **paired_verdict(ref, got)}
            if not judge:  # the bound is for the full recipe, not a few iterations
                row.pop('ok')
                row['verdict'] = 'not judged (quick)'
            rows.append(row)
    return rows


def check_infer(quick: bool, device: str, side: int = 2048, tile: int = 512) -> list[dict]:
    """Seconds per megapixel and peak memory of the whole, exact-tiled and bf16 restorations (the Restorer of
    ``baryir infer``), and the largest difference of the tiles and of bf16 from the whole float32 result."""
    import numpy as np

    from baryir_plugin.inference.infer import Restorer
    from baryir_plugin.inference.weights import build_network

    if quick:
        side, tile = 96, 32
    options = ({'type': 'BaryIR', 'dim': 8, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1,
                'num_bary_blocks': 1} if quick else {'type': 'BaryIR'})
    torch.manual_seed(0)
    dev = torch.device(device)
    net = build_network(options, 'the infer check').eval().requires_grad_(False).to(dev)
    rgb = np.random.default_rng(0).random((side, side, 3), dtype=np.float32)
    modes = {'whole': Restorer(net, options, dev, tile=0), f'exact {tile}': Restorer(net, options, dev, tile=tile),
             'whole bf16': Restorer(net, options, dev, 'bf16', tile=0)}
    rows, base = [], None
    for name, restorer in modes.items():
        restorer.restore(rgb[:64, :64])  # warm-up
        if dev.type == 'cuda':
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        try:
            out = restorer.restore(rgb)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append({'check': 'infer', 'mode': name, 'ok': None, 'note': f'out of memory at {side}x{side}'})
            continue
        if dev.type == 'cuda':
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        row = {'check': 'infer', 'mode': name, 'size': f'{side}x{side}', 's_per_mp': seconds / (side * side / 1e6)}
        if dev.type == 'cuda':
            row['peak_gib'] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
        if base is None:
            base = out
        else:
            row['max_abs_diff'] = float(np.abs(out - base).max())
            row['ok'] = row['max_abs_diff'] < (1e-3 if 'exact' in name else 0.1)
        rows.append(row)
    return rows


def _format(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        body = ', '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in r.items() if k != 'check')
        lines.append(f'{r["check"]:<8} {body}')
    return '\n'.join(lines)


def run(checks=CHECKS, quick: bool = False, device: str = 'cuda', out_dir: Optional[str] = None,
        fixture: Optional[Path] = None, budget_s: float = 300.0, steps_modes: Optional[list[str]] = None,
        demo_seeds: tuple = (10,), demo_val_photos: Optional[list] = None,
        log: Callable[[str], None] = print) -> dict:
    """Run the checks, print each group as it finishes, write ``gpu_check.json``; returns the report."""
    start = time.monotonic()
    report = {'machine': machine_line(device), 'device': device, 'quick': quick, 'rows': []}
    log(f'machine: {report["machine"]}')
    with tempfile.TemporaryDirectory() as tmp:
        for name in checks:
            t0 = time.monotonic()
            try:
                if name == 'parity':
                    if fixture is None or not (fixture / 'expected_outputs.pt').exists():
                        rows = [{'check': 'parity', 'skipped': 'no reference fixture (--fixture)'}]
                    else:
                        rows = check_parity(fixture, device)
                elif name == 'steps':
                    modes = steps_modes or (QUICK_MODES if quick else STEP_MODES)
                    rows = check_steps(quick, device, modes, batches=(3,) if quick else (3, 8),
                                       warmup=1 if quick else 3, iters=2 if quick else 10,
                                       deadline=start + budget_s)
                elif name == 'kernels':
                    rows = check_kernels(quick, device)
                elif name == 'ddp':
                    rows = check_ddp(device, Path(tmp))
                elif name == 'bf16':
                    rows = check_bf16(quick, device, iters=5 if quick else 100)
                elif name == 'demo':
                    rows = check_demo(device, Path(tmp), iters=4 if quick else 1000, judge=not quick, seeds=demo_seeds,
                                      val_photos=demo_val_photos)
                elif name == 'infer':
                    rows = check_infer(quick, device)
                else:
                    raise ValueError(f'unknown check {name!r}; checks: {CHECKS}')
            except Exception as e:  # noqa: BLE001 (one failing check must not hide the others' results)
                first = str(e).strip().splitlines()[0] if str(e).strip() else ''
                rows = [{'check': name, 'ok': False, 'error': f'{type(e).__name__}: {first}'[:300]}]
            for r in rows:
                r.setdefault('seconds_group', time.monotonic() - t0)
            report['rows'].extend(rows)
            log(_format(rows))
    report['seconds'] = time.monotonic() - start
    if out_dir:
        from baryir_plugin.models.validation_report import write_json
        write_json(os.path.join(out_dir, 'gpu_check.json'), report)
    return report

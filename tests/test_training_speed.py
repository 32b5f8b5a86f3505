"""Training speed options (mixed precision, channels-last, compile, checkpointing) and the estimator
options of the objective: each changes what it says and nothing else."""
from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import pytest
import torch
from basicsr.models import build_model

from baryir_plugin.analysis import mode_options
from baryir_plugin.archs.restormer_blocks import LayerNorm2d, TransformerStage
from baryir_plugin.losses import transport_cost
from baryir_plugin.models import training_speed

from .conftest import REPO, copy_for_resume, load_script, run, shared_path
from .test_baryir_model import _DRIVER, MODEL_YML, _batch, _losses, _opt


def _model(workdir, top: dict | None = None, seed: int = 0, **train):
    opt = _opt(workdir, **train)
    opt.update(top or {})
    torch.manual_seed(seed)
    return build_model(opt)


@pytest.mark.parametrize('top, train, message', [
    ({'use_amp': 'yes'}, {}, 'use_amp must be true or false'),
    ({'compile_mode': 'fastest'}, {}, 'compile_mode must be one of'),
    ({}, {'checkpointing': {'stages': ['encoder9']}}, r"\['encoder9'\] are not stages of this network"),
    ({}, {'checkpointing': {'every': 0}}, 'every must be an integer >= 1'),
    ({}, {'checkpointing': 'yes'}, 'checkpointing must be true, false or'),
    ({}, {'sample_weighting': 'inverse'}, 'sample_weighting must be one of'),
    ({}, {'congruence_step': 'both'}, 'congruence_step must be one of'),
    ({}, {'optim_g': {'type': 'RMSprop', 'lr': 1e-4, 'fused': True}}, "RMSprop has no 'fused' option"),
])
def test_options_are_checked_when_the_model_is_built(workdir, monkeypatch, top, train, message):
    monkeypatch.chdir(workdir)
    with pytest.raises(ValueError, match=message):
        _model(workdir, top, **train)


def test_importance_weights_are_lambda_over_the_source_share(workdir, monkeypatch):
    """Batches draw source k with probability p_k = N_k / N; importance weights lambda_k / p_k undo that."""
    monkeypatch.chdir(workdir)
    for mode in ('proportional', 'inverse'):
        models = []
        for weighting in ('lambda', 'importance'):
            opt = _opt(workdir, lambda_mode=mode, sample_weighting=weighting)
            opt['datasets']['train']['sources'][1]['repeat'] = 3  # 8 noise and 12 rain samples: p = 0.4, 0.6
            models.append(build_model(opt))
        lam_model, imp_model = models
        share = torch.tensor([0.4, 0.6])
        assert torch.allclose(lam_model.sample_weights, lam_model.lambdas)
        assert torch.allclose(imp_model.sample_weights, imp_model.lambdas / share)
        # the expected weight of a drawn sample's source is then sum_k p_k * lambda_k / p_k = 1
        assert float((share * imp_model.sample_weights).sum()) == pytest.approx(1.0, rel=1e-6)
    assert not torch.allclose(imp_model.sample_weights, lam_model.sample_weights)


def test_separate_congruence_step_is_a_second_optimizer_step(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    for step, expected in (('separate', 2), ('joint', 1)):
        model = _model(workdir, congruence_step=step)
        model.feed_data(_batch(_opt(workdir)))
        calls = []
        original = model.optimizer_potential.step
        model.optimizer_potential.step = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
        model.optimize_parameters(1)
        assert len(calls) == expected, step


def test_activation_checkpointing_recomputes_and_changes_nothing_else(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    batch = _batch(_opt(workdir))
    plain = _model(workdir)
    ckpt = _model(workdir, checkpointing={'stages': ['encoder1', 'decoder1', 'refinement'], 'every': 1})
    stages = {n: m for n, m in ckpt.net_g.named_modules() if isinstance(m, TransformerStage)}
    assert [n for n, m in stages.items() if m.checkpoint_every] == ['encoder1', 'decoder1', 'refinement']
    calls = []
    stages['decoder1'][0].register_forward_pre_hook(lambda *a: calls.append(1))
    results = []
    for model in (plain, ckpt):
        model.feed_data(batch)
        losses = model.network_step()
        results.append((losses, [p.detach().clone() for p in model.net_g.parameters()]))
    assert len(calls) == 2  # once forward, once recomputed in the backward pass
    for key, value in results[0][0].items():
        assert float(results[1][0][key]) == pytest.approx(float(value), rel=1e-5, abs=1e-7), key
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, atol=1e-6)


def test_channels_last_training_keeps_the_layout_and_the_losses(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    batch = _batch(_opt(workdir))
    plain = _model(workdir)
    cl = _model(workdir, {'use_channels_last': True})
    convs = [m.weight for m in cl.net_g.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    outs = []
    for model in (plain, cl):
        model.feed_data(batch)
        with torch.no_grad():
            total, losses, _ = model.network_losses()
        outs.append((float(total), model.output))
    assert outs[1][1].is_contiguous(memory_format=torch.channels_last)
    assert outs[1][0] == pytest.approx(outs[0][0], rel=1e-5)
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-5)
    cl.feed_data(batch)
    cl.optimize_parameters(1)
    assert all(w.grad is None or w.grad.is_contiguous(memory_format=torch.channels_last) for w in convs)


def test_layernorm_channels_last_path_makes_no_copy_and_agrees():
    torch.manual_seed(0)
    norm = LayerNorm2d(16)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 16, 5, 7)
    out_cl = norm(x.contiguous(memory_format=torch.channels_last))
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out_cl, norm(x), atol=1e-6)
    assert norm(x).is_contiguous()


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_mixed_precision_steps_keep_the_fragile_parts_in_float32(workdir, monkeypatch, dtype):
    monkeypatch.chdir(workdir)
    model = _model(workdir, {'use_amp': True, 'amp_bf16': dtype == torch.bfloat16})
    assert (model.scalers[0] is not None) == (dtype == torch.float16)
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, output.dtype)  # returns None: the output is left as it is
        return hook
    for m in model.net_g.modules():
        if isinstance(m, LayerNorm2d):
            m.register_forward_hook(record('layernorm'))
    next(m for m in model.net_g.modules() if isinstance(m, torch.nn.Conv2d)).register_forward_hook(record('conv'))
    model.feed_data(_batch(_opt(workdir)))
    total, losses, (cost, potential, z_bary) = model.network_losses()
    assert seen == {'layernorm': torch.float32, 'conv': dtype}
    assert cost.dtype == potential.dtype == torch.float32 and z_bary.dtype == torch.float32
    for it in (1, 2):
        model.optimize_parameters(it)
    log = model.get_current_log()
    assert all(v == v and abs(v) < float('inf') for v in log.values()), log
    scales = {k: v for k, v in log.items() if k.startswith('loss_scale_')}
    if dtype == torch.float16:  # each halving of the initial 2**16 is a step skipped on overflow
        assert set(scales) == {'loss_scale_g', 'loss_scale_potential'}
        assert all(v == model.scalers[i].get_scale() for i, v in enumerate(scales.values()))
    else:
        assert not scales
    with torch.autocast('cpu', dtype=dtype):
        assert transport_cost(z_bary.to(dtype), z_bary.to(dtype) + 1).dtype == torch.float32


@pytest.mark.parametrize('precision', ['bf16', 'fp16'])
def test_mixed_precision_resume_reproduces_the_uninterrupted_run(workdir, tmp_path, precision):
    """Straight 6 iterations vs stop at 2 and --auto_resume (scaler state included for fp16)."""
    driver = tmp_path / 'driver.py'
    driver.write_text(_DRIVER)
    force = ['--force_yml', 'use_amp=true', f'amp_bf16={"true" if precision == "bf16" else "false"}']
    straight = tmp_path / 'straight.jsonl'
    run([sys.executable, str(driver), str(straight), 'train', '-opt', str(MODEL_YML)] + force, cwd=workdir)
    src = workdir / 'experiments' / 'baryir_model_tiny'
    state = torch.load(src / 'training_states' / '2.state', weights_only=True)
    if precision == 'fp16':
        assert len(state['scalers']) == 2 and all(s['scale'] > 0 for s in state['scalers'])
    else:
        assert state['scalers'] == [None, None]

    resumed_dir = copy_for_resume(workdir, tmp_path / 'resumed')
    resumed = tmp_path / 'resumed.jsonl'
    run([sys.executable, str(driver), str(resumed), 'train', '-opt', str(MODEL_YML), '--auto_resume'] + force,
        cwd=resumed_dir)
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == [3, 4, 5, 6]
    for it in (3, 4, 5, 6):
        for key, value in a[it].items():
            assert b[it][key] == pytest.approx(value, abs=1e-5), f'{precision} iter {it} {key}'


def test_compile_falls_back_with_a_warning_where_unavailable(workdir, monkeypatch, caplog):
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(training_speed, 'compile_unavailable', lambda device: 'no C++ compiler found')
    with caplog.at_level(logging.WARNING, logger='basicsr'):
        model = _model(workdir, {'use_compile': True})
    assert not model.speed.compile
    assert 'torch.compile is not available here (no C++ compiler found)' in caplog.text
    model.feed_data(_batch(_opt(workdir)))
    model.optimize_parameters(1)


def test_compile_is_unavailable_without_a_cpu_compiler(monkeypatch):
    monkeypatch.setattr(training_speed.shutil, 'which', lambda name: None)
    monkeypatch.delenv('CXX', raising=False)
    assert 'no C++ compiler' in training_speed.compile_unavailable(torch.device('cpu'))


def test_benchmark_modes_name_the_options():
    assert mode_options('base') == ({}, {})
    top, train = mode_options('bf16+cl+reuse+ckpt')
    assert top == {'use_amp': True, 'amp_bf16': True, 'use_channels_last': True}
    assert train == {'potential_step': 'reuse', 'checkpointing': True}
    for bad, message in (('bf16+fast', 'unknown mode token'), ('bf16+fp16', 'both bf16 and fp16'),
                         ('ckpt+ckpt-full-res', 'two checkpointing presets')):
        with pytest.raises(ValueError, match=message):
            mode_options(bad)


def test_bench_train_step_runs_modes_in_one_table(tmp_path):
    out = run([sys.executable, str(REPO / 'scripts' / 'bench_train_step.py'), '--dim', '8', '--num-blocks', '1', '1',
               '1', '1', '--num-refinement-blocks', '1', '--num-bary-blocks', '1', '--crop', '32', '--batch', '2',
               '--warmup', '1', '--iters', '1', '--modes', 'base', 'bf16+cl+reuse', 'ckpt',
               '--json', str(tmp_path / 'bench.json')], cwd=tmp_path, timeout=300)
    lines = out.stdout.splitlines()
    assert lines[0].startswith('machine: ') and 'torch' in lines[0]
    rows = [line.split() for line in lines if line.split() and line.split()[0] in ('base', 'bf16+cl+reuse', 'ckpt')]
    assert [r[0] for r in rows] == ['base', 'bf16+cl+reuse', 'ckpt'] and rows[0][4] == '1.00'
    cmd = [sys.executable, str(REPO / 'scripts' / 'bench_train_step.py'), '--modes', 'base', 'turbo']
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "unknown mode token(s) ['turbo']" in proc.stderr, proc.stderr


def test_gpu_check_without_a_gpu_says_so_in_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip('a GPU is visible here')
    script = load_script('gpu_check')
    from baryir_plugin.errors import guarded_main
    assert guarded_main('scripts/gpu_check.py', script.main, ['--out', 'unused']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'no CUDA device' in err[0] and '--device cpu --quick' in err[0]


def test_gpu_check_self_test_on_cpu(tmp_path):
    """The whole script on a tiny network on the CPU: every check reports, gloo stands in for NCCL."""
    fixture = shared_path('fixtures', 'reference_small')
    out = run([sys.executable, str(REPO / 'scripts' / 'gpu_check.py'), '--device', 'cpu', '--quick', '--out',
               str(tmp_path / 'out'), '--fixture', str(fixture), '--modes', 'base', 'bf16+cl+reuse', 'ckpt'],
              cwd=tmp_path, timeout=600)
    report = json.loads((tmp_path / 'out' / 'gpu_check.json').read_text())
    checks = [r['check'] for r in report['rows']]
    assert checks.count('parity') == 2 and checks.count('steps') == 3 and checks.count('kernels') == 2
    assert 'ddp' in checks and 'bf16' in checks and checks.count('demo') == 5, out.stdout
    demo = [r for r in report['rows'] if r['check'] == 'demo']
    assert [r['precision'] for r in demo] == ['fp32', 'bf16', 'fp16', 'bf16', 'fp16']
    assert all('val_average_psnr' in r for r in demo[:3]) and all('diff_db' in r for r in demo[3:])
    assert all(r.get('ok', True) for r in report['rows']), out.stdout
    parity = report['rows'][0]
    assert parity['tf32'] is False and parity['max_abs_error'] < 1e-4
    kernels = [r for r in report['rows'] if r['check'] == 'kernels']
    assert all(0 < r['conv_share'] + r['matmul_share'] <= 1 for r in kernels)
    assert 'scripts/gpu_check.py: ' in out.stdout and ' 0 failed' in out.stdout


def test_recipes_without_speed_options_train_in_float32(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    model = _model(workdir)
    assert not model.speed.use_amp and not model.speed.channels_last and not model.speed.compile
    assert model.scalers == [None, None] and model.speed.checkpointing is None


def test_amp_sensitivity_measures_every_region():
    from baryir_plugin.analysis import BenchConfig
    from baryir_plugin.analysis.amp_sensitivity import sensitivity
    from baryir_plugin.archs.precision import FP32_REGIONS, fp32_regions

    config = BenchConfig(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, num_bary_blocks=1, batch=3, crop=32)
    rows = sensitivity(config, [torch.bfloat16])
    assert [r['fp32'] for r in rows] == ['all'] + [f'all but {r}' for r in FP32_REGIONS] + ['none']
    assert fp32_regions() == FP32_REGIONS  # restored after the measurement
    everything = rows[0]
    assert 0 < everything['l_pix'] < 1e-2 and 0 < everything['grad_network'] < 1
    # with nothing kept in float32 the latents arrive in bf16 and the transport cost moves with them
    nothing = rows[-1]
    assert nothing['transport_cost'] > everything['transport_cost']
    assert 0 < everything['grad_median'] < 1 and 0 <= everything['grad_sign_flips'] < 0.5


def test_per_element_gradient_error_counts_sign_flips_and_skips_zeros():
    from baryir_plugin.analysis.amp_sensitivity import _per_element

    reference = torch.tensor([1.0, -2.0, 4.0, 0.0, 8.0, 16.0], dtype=torch.float64)
    value = torch.tensor([1.5, 2.0, 4.0, 5.0, 8.0, 20.0], dtype=torch.float64)  # the zero's element is not judged
    median, flips = _per_element(value, reference)  # relative errors 0.5, 2, 0, 0, 0.25
    assert median == pytest.approx(0.25) and flips == pytest.approx(0.2)
    assert _per_element(torch.tensor([float('inf'), 1.0]), torch.tensor([1.0, 1.0])) == (math.inf, math.inf)


def test_channels_last_bf16_under_torchrun_keeps_ranks_equal_without_stride_warnings(workdir, tmp_path):
    """Two gloo ranks, channels-last + bf16: DDP's buckets follow the converted weights' strides (no
    'grad strides do not match' warning) and both ranks hold the same networks after the step."""
    from .test_baryir_model import _RANK_DRIVER
    driver, ranks = tmp_path / 'driver.py', tmp_path / 'ranks'
    driver.write_text(_RANK_DRIVER)
    ranks.mkdir()
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(driver), str(ranks),
           'train', '-opt', str(MODEL_YML), '--launcher', 'pytorch', '--force_yml', 'use_channels_last=true',
           'use_amp=true', 'amp_bf16=true', 'train:total_iter=2', 'logger:save_checkpoint_freq=2', 'name=ddp_cl_bf16']
    proc = run(cmd, cwd=workdir, timeout=600)
    assert 'grad strides do not match' not in (proc.stdout + proc.stderr).lower()
    saved = [torch.load(ranks / f'2_rank{r}.pt', weights_only=True) for r in (0, 1)]
    for net in ('net_g', 'net_potential'):
        for key, value in saved[0][net].items():
            assert torch.equal(value, saved[1][net][key]), f'{net}.{key} differs between ranks'


def test_gpu_check_names_a_missing_or_broken_fixture(tmp_path):
    script = [sys.executable, str(REPO / 'scripts' / 'gpu_check.py'), '--device', 'cpu', '--quick', '--checks',
              'parity', '--out', str(tmp_path / 'out'), '--fixture']
    missing = subprocess.run(script + [str(tmp_path / 'nowhere')], capture_output=True, text=True)
    assert missing.returncode == 2 and 'no expected_outputs.pt there' in missing.stderr
    broken = tmp_path / 'broken'
    broken.mkdir()
    for name in ('expected_outputs.pt', 'official_format_checkpoint.pt'):
        (broken / name).write_bytes(b'not a checkpoint')
    proc = subprocess.run(script + [str(broken)], capture_output=True, text=True)
    rows = json.loads((tmp_path / 'out' / 'gpu_check.json').read_text())['rows']
    assert proc.returncode == 1 and rows[0]['ok'] is False
    assert f'cannot read the reference fixture in {broken}' in rows[0]['error'] and '\n' not in rows[0]['error']


def test_paired_verdict_judges_the_interval_not_the_mean():
    from baryir_plugin.analysis.gpu_check import paired_verdict

    fp32 = [22.0, 21.9, 22.1, 21.8, 22.2, 22.0]
    close = paired_verdict(fp32, [v + d for v, d in zip(fp32, (0.02, -0.01, 0.03, 0.0, -0.02, 0.01))])
    assert close['ok'] is True and close['diff_db'] == pytest.approx(0.005)
    lo, hi = close['ci95_db']
    assert -0.1 < lo < 0.005 < hi < 0.1 and close['diffs_db'][0] == pytest.approx(0.02)
    # the same mean cost, but spread like the demo's two-image sets: the interval cannot decide
    spread = paired_verdict(fp32, [v + d for v, d in zip(fp32, (-0.33, 0.15, -1.0, 0.44, -0.72, 0.12))])
    assert spread['ok'] is None and 'undecided' in spread['verdict']
    assert spread['se_db'] == pytest.approx(spread['sd_db'] / math.sqrt(6))
    worse = paired_verdict(fp32, [v - 0.5 + d for v, d in zip(fp32, (0.02, -0.01, 0.03, 0.0, -0.02, 0.01))])
    assert worse['ok'] is False and worse['ci95_db'][1] < -0.1
    one = paired_verdict([22.0], [22.01])
    assert one['ok'] is None and 'one seed' in one['verdict'] and 'ci95_db' not in one
    with pytest.raises(ValueError, match='one value per seed'):
        paired_verdict([22.0, 21.0], [22.0])


def test_gpu_check_demo_validates_on_the_users_photos(tmp_path):
    """--demo-val-photos: the demo check trains on the demo's tiles and validates on crops of these photos."""
    import cv2
    import numpy as np

    photos = tmp_path / 'photos'
    photos.mkdir()
    rng = np.random.default_rng(3)
    for i in range(2):  # smooth colour fields, larger than the 128-pixel crop
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        cv2.imwrite(str(photos / f'p{i}.png'), cv2.resize(small, (180, 140), interpolation=cv2.INTER_CUBIC))
    run([sys.executable, str(REPO / 'scripts' / 'gpu_check.py'), '--device', 'cpu', '--quick', '--checks', 'demo',
         '--demo-seeds', '3', '4', '--demo-val-photos', str(photos), '--out', str(tmp_path / 'out')],
        cwd=tmp_path, timeout=600)
    rows = json.loads((tmp_path / 'out' / 'gpu_check.json').read_text())['rows']
    runs = [r for r in rows if 'seed' in r]
    assert [(r['precision'], r['seed']) for r in runs] == [(p, s) for p in ('fp32', 'bf16', 'fp16') for s in (3, 4)]
    assert all(r['val_images'] == 2 * 5 for r in runs)  # two photos, degraded the five ways
    verdicts = [r for r in rows if 'seeds' in r]
    assert [r['precision'] for r in verdicts] == ['bf16', 'fp16']
    for r in verdicts:
        ref = [x['val_average_psnr'] for x in runs if x['precision'] == 'fp32']
        got = [x['val_average_psnr'] for x in runs if x['precision'] == r['precision']]
        assert r['diffs_db'] == pytest.approx([g - f for f, g in zip(ref, got)])
        assert 'ok' not in r and r['verdict'] == 'not judged (quick)'

"""Each BasicSR 1.4.2 compat patch: the breakage it fixes and the behaviour it must keep."""
from __future__ import annotations

import collections
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from baryir_plugin import compat
from baryir_plugin.errors import CheckpointError

from .conftest import free_port


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_every_patch_is_applied():
    assert compat.applied() == list(compat.PATCH_NAMES)


def test_functional_tensor_shim_is_what_makes_basicsr_importable():
    ok = _python('import baryir_plugin, basicsr, torchvision.transforms.functional_tensor as ft; '
                 'print(callable(ft.rgb_to_grayscale))')
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == 'True'
    broken = _python('import baryir_plugin', env={'BARYIR_COMPAT_SKIP': 'functional_tensor'})
    assert broken.returncode != 0
    assert 'functional_tensor' in broken.stderr


def test_unknown_skip_name_is_rejected():
    proc = _python('import baryir_plugin', env={'BARYIR_COMPAT_SKIP': 'no_such_patch'})
    assert proc.returncode != 0
    assert 'BARYIR_COMPAT_SKIP' in proc.stderr and 'no_such_patch' in proc.stderr


def _write_state(path, it: int) -> None:
    from basicsr.models.lr_scheduler import MultiStepRestartLR

    net = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    net(torch.ones(1, 2)).sum().backward()
    opt.step()
    sched = MultiStepRestartLR(opt, milestones=[5, 10])  # its state holds a collections.Counter
    torch.save({'epoch': 0, 'iter': it, 'optimizers': [opt.state_dict()], 'schedulers': [sched.state_dict()]}, path)


def _train_opt(tmp_path, auto_resume: bool) -> dict:
    states = tmp_path / 'experiments' / 'x' / 'training_states'
    return {'name': 'x', 'auto_resume': auto_resume, 'num_gpu': 0, 'network_g': {'type': 'BaryIR'},
            'path': {'training_states': str(states), 'models': str(tmp_path / 'experiments' / 'x' / 'models')}}


def test_resume_loads_on_cpu_with_weights_only_and_picks_latest_numerically(tmp_path):
    import basicsr.train

    opt = _train_opt(tmp_path, auto_resume=True)
    states = tmp_path / 'experiments' / 'x' / 'training_states'
    states.mkdir(parents=True)
    models = tmp_path / 'experiments' / 'x' / 'models'
    models.mkdir()
    for it in (9, 10):
        _write_state(states / f'{it}.state', it)
        torch.save({'params': torch.nn.Linear(2, 2).state_dict()}, models / f'net_g_{it}.pth')
    (states / 'notes.txt').write_text('not a state')
    state = basicsr.train.load_resume_state(opt)
    assert state['iter'] == 10
    assert opt['path']['resume_state'].endswith('10.state')
    assert isinstance(state['schedulers'][0]['milestones'], collections.Counter)
    exp_avg = state['optimizers'][0]['state'][0]['exp_avg']
    assert exp_avg.device.type == 'cpu'
    # check_resume pointed the network at the matching checkpoint
    assert opt['path']['pretrain_network_g'].endswith('net_g_10.pth')


def test_resume_refuses_pickled_code(tmp_path):
    import basicsr.train

    opt = _train_opt(tmp_path, auto_resume=False)
    opt['path']['resume_state'] = str(tmp_path / 'evil.state')
    torch.save({'iter': 1, 'payload': _Evil()}, opt['path']['resume_state'])
    with pytest.raises(CheckpointError, match='path.resume_state .*pickled objects'):
        basicsr.train.load_resume_state(opt)
    assert not (tmp_path / 'pwned').exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ('touch pwned',))


def test_resume_state_missing_file_names_the_option(tmp_path):
    import basicsr.train

    opt = _train_opt(tmp_path, auto_resume=False)
    opt['path']['resume_state'] = str(tmp_path / 'nope.state')
    with pytest.raises(CheckpointError, match='path.resume_state .*no such file'):
        basicsr.train.load_resume_state(opt)


def test_init_dist_uses_gloo_on_cpu_without_spawn_and_ddp_takes_cpu_modules():
    proc = _python(
        """
        import torch, torch.distributed as dist, torch.multiprocessing as mp
        import baryir_plugin
        from basicsr.utils.options import init_dist
        from basicsr.models.base_model import BaseModel
        init_dist('pytorch')
        model = BaseModel({'num_gpu': 0, 'is_train': False, 'dist': True})
        net = model.model_to_device(torch.nn.Linear(3, 2))
        net(torch.ones(4, 3)).sum().backward()
        print(dist.get_backend(), mp.get_start_method(allow_none=True), type(net).__name__, net.device_ids)
        from baryir_plugin.compat import shutdown_distributed
        shutdown_distributed()
        print('initialized after shutdown:', dist.is_initialized())
        """,
        env={'RANK': '0', 'LOCAL_RANK': '0', 'WORLD_SIZE': '1', 'MASTER_ADDR': '127.0.0.1',
             'MASTER_PORT': str(free_port()), 'CUDA_VISIBLE_DEVICES': ''})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-2] == 'gloo None DistributedDataParallel None'
    assert lines[-1] == 'initialized after shutdown: False'


def test_jpeg_quality_may_be_a_float():
    from basicsr.data import degradations

    img = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    out = degradations.add_jpg_compression(img, quality=47.6)
    assert out.shape == img.shape and out.dtype == np.float32
    assert np.abs(out - img).mean() > 1e-3  # compressed, not passed through
    np.random.seed(0)
    out = degradations.random_add_jpg_compression(img, quality_range=[30, 95])  # draws a float quality
    assert out.shape == img.shape


def test_cpu_prefetcher_creates_one_iterator_per_epoch():
    import basicsr.train

    class CountingLoader:
        def __init__(self):
            self.iters = 0

        def __iter__(self):
            self.iters += 1
            return iter([1, 2])

    loader = CountingLoader()
    pre = basicsr.train.CPUPrefetcher(loader)
    assert loader.iters == 0
    pre.reset()  # train_pipeline resets before the first batch of every epoch
    assert [pre.next(), pre.next(), pre.next()] == [1, 2, None]
    assert loader.iters == 1
    pre.reset()
    assert pre.next() == 1 and loader.iters == 2


def test_any_torch_optimizer_by_name():
    from basicsr.models.base_model import BaseModel

    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = BaseModel.get_optimizer(None, 'RMSprop', params, 1e-4, alpha=0.99, eps=1e-8)
    assert isinstance(opt, torch.optim.RMSprop) and opt.defaults['alpha'] == 0.99
    assert isinstance(BaseModel.get_optimizer(None, 'AdamW', params, 1e-4), torch.optim.AdamW)
    with pytest.raises(ValueError, match="'Adamm'.*RMSprop"):
        BaseModel.get_optimizer(None, 'Adamm', params, 1e-4)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    from basicsr.models.base_model import BaseModel

    model = BaseModel({'num_gpu': 0, 'is_train': True, 'dist': False, 'path': {'models': str(tmp_path)}})
    net = torch.nn.Linear(2, 2)
    model.save_network(net, 'net_g', 5)
    path = tmp_path / 'net_g_5.pth'
    before = path.read_bytes()
    assert torch.load(path, weights_only=True)['params']['weight'].shape == (2, 2)

    def failing_save(obj, f, *args, **kwargs):
        f.write(b'partial')
        raise OSError('disk full')

    monkeypatch.setattr(torch, 'save', failing_save)
    monkeypatch.setattr('baryir_plugin.compat.time.sleep', lambda s: None)
    with torch.no_grad():
        net.weight.add_(1)
    with pytest.raises(OSError, match='disk full'):  # retried, then an error: training must not go on unsaved
        model.save_network(net, 'net_g', 5)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['net_g_5.pth']

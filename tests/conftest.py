"""Shared fixtures. Importing baryir_plugin first applies the BasicSR compat patches."""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import baryir_plugin  # noqa: F401  (must precede any basicsr import)
from baryir_plugin.data import demo

REPO = Path(__file__).resolve().parents[1]
OPTIONS = REPO / 'tests' / 'options'
SHARED = Path(os.environ.get('BARYIR_SHARED', REPO.parent / 'shared'))
# CI sets this: tests that read ../shared must run there, never skip.
REQUIRE_SHARED = os.environ.get('BARYIR_REQUIRE_SHARED') == '1'


def shared_path(*parts: str) -> Path:
    """A path under ../shared; skips the test (fails under BARYIR_REQUIRE_SHARED=1) when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        reason = f'{path} is absent (the shared fixtures/data live beside the repository, not in it)'
        if REQUIRE_SHARED:
            pytest.fail(f'BARYIR_REQUIRE_SHARED=1 but {reason}')
        pytest.skip(reason)
    return path


def load_script(name: str):
    """Import scripts/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(f'scripts_{name}', REPO / 'scripts' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='session')
def tiny_dataset(tmp_path_factory) -> Path:
    """The tiny paired set (folders + LMDB twins) under <tmp>/datasets/tiny, built once per session."""
    root = tmp_path_factory.mktemp('tiny_data')
    demo.build(str(root / 'datasets' / 'tiny'), preset='tiny', lmdb=True)
    return root / 'datasets' / 'tiny'


@pytest.fixture()
def workdir(tmp_path, tiny_dataset) -> Path:
    """A fresh working directory holding datasets/tiny, as a BasicSR user's project root would."""
    (tmp_path / 'datasets').mkdir()
    os.symlink(tiny_dataset, tmp_path / 'datasets' / 'tiny')
    return tmp_path


def copy_for_resume(workdir: Path, dest: Path, iteration: int = 2, name: str = 'baryir_model_tiny') -> Path:
    """A fresh project folder ``dest`` holding only the checkpoints and training state that the run in
    ``workdir`` saved at ``iteration`` (and the same datasets), for ``--auto_resume`` from there."""
    src = workdir / 'experiments' / name
    exp = dest / 'experiments' / name
    (exp / 'models').mkdir(parents=True)
    (exp / 'training_states').mkdir()
    for net in ('net_g', 'net_potential'):
        shutil.copy(src / 'models' / f'{net}_{iteration}.pth', exp / 'models' / f'{net}_{iteration}.pth')
    shutil.copy(src / 'training_states' / f'{iteration}.state', exp / 'training_states' / f'{iteration}.state')
    (dest / 'datasets').symlink_to(workdir / 'datasets')
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def bin_path(name: str) -> str:
    """A console script of this environment (beside the running interpreter)."""
    candidate = Path(sys.executable).with_name(name)
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        pytest.fail(f'console script {name!r} not found; install the package (pip install -e .)')
    return found


def run(cmd: list[str], cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command, fail the test with its output if it exits non-zero."""
    full_env = {**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if proc.returncode != 0:
        pytest.fail(f'{" ".join(cmd)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}'
                    f'\n--- stderr ---\n{proc.stderr[-6000:]}')
    return proc


# the demo network (options/train_baryir_demo.yml's network_g)
DEMO_NETWORK = {'type': 'BaryIR', 'dim': 8, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1,
                'heads': [1, 2, 4, 8], 'num_bary_blocks': 1}


@pytest.fixture(scope='session')
def demo_checkpoint(tmp_path_factory) -> Path:
    """A net_g file of the demo network as training writes it ({'params', 'baryir_config'}), seeded weights
    with the output layer scaled up so that the network visibly changes its input."""
    import torch

    import baryir_plugin  # noqa: F401
    from baryir_plugin.archs import BaryIR
    from baryir_plugin.checkpoints import NETWORK_OPTIONS_KEY

    torch.manual_seed(0)
    net = BaryIR(**{k: v for k, v in DEMO_NETWORK.items() if k != 'type'})
    with torch.no_grad():
        net.output.weight.mul_(4)
    path = tmp_path_factory.mktemp('demo_checkpoint') / 'net_g_demo.pth'
    torch.save({'params': net.state_dict(), NETWORK_OPTIONS_KEY: dict(DEMO_NETWORK)}, path)
    return path

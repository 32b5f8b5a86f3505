"""Make basicsr 1.4.2 (the last PyPI release) work with today's torch, torchvision, OpenCV and on CPU.

This is the only module that patches BasicSR. Every patch replaces an in-process attribute that BasicSR
looks up at call time: no file in site-packages is touched and no copy of BasicSR is shipped.
``apply()`` runs when ``baryir_plugin`` is imported, before anything of ours imports ``basicsr``.

Patches (name: what breaks without it):

- ``functional_tensor``: torchvision >= 0.17 removed ``torchvision.transforms.functional_tensor``,
  which ``basicsr.data.degradations`` imports, so ``import basicsr`` dies.
- ``resume_state``: resuming maps every storage to ``torch.cuda.current_device()`` (fails without a GPU),
  and torch >= 2.6 loads with ``weights_only=True``; training states are loaded onto the model's device
  with an explicit allow-list instead. The same hook (it runs before any dataset is built) copies the
  run's ``manual_seed`` into the train set's options and checks its loader options.
- ``init_dist``: BasicSR hard-codes NCCL and ``torch.cuda.set_device``; we pick NCCL only when CUDA is
  available (device from LOCAL_RANK), gloo otherwise, and stop forcing the 'spawn' start method on CPU.
- ``ddp_device_ids``: DistributedDataParallel is given CUDA ``device_ids`` even for CPU modules.
- ``jpeg_quality``: OpenCV >= 4.5.4 rejects a float JPEG quality in ``cv2.imencode``.
- ``lazy_prefetcher``: ``CPUPrefetcher`` calls ``iter()`` twice before the first batch, orphaning a
  loader iterator (and its workers); with persistent workers this can hang.
- ``resume_position``: a resumed run restarts its epoch from the first batch; the sampler now skips the
  batches that were already trained on (with the random states BaryIRModel saves, a resumed run sees
  the same data as an uninterrupted one). Its indices carry the epoch and the slot in the epoch
  (``SampleIndex``), from which the plugin's datasets seed each sample's draws (fresh every epoch, and
  independent of the number of loader workers).
- ``optimizers``: BasicSR 1.4.2 only builds Adam; any ``torch.optim`` class is accepted by name. The
  optimizer's and the scheduler's own checks of their options (a negative lr, periods and weights of
  different lengths) are one OptionError naming ``train.optim_*`` / ``train.scheduler``.
- ``atomic_save``: checkpoints and training states are written to a temporary file and renamed, so a
  crash mid-write never leaves a truncated ``.pth``/``.state`` behind.
- ``archive_names``: a second run of one experiment name within the same second fails, because BasicSR
  archives the old folder under a name with one-second resolution that already exists; a counter is
  added.
- ``checkpoints``: loading a missing, truncated or foreign ``.pth`` ends in a traceback from deep inside
  torch; it is one CheckpointError naming the file (and, for weights that do not fit, the keys). Weights
  holding NaN/inf are never saved (that iteration's networks and state are skipped, the previous kept).
  ``--auto_resume`` falls back past an unreadable newest state or network file to the newest complete
  set, and the start-up removes the temporary files of interrupted saves.
- ``data_checks``: an unreadable image ends in ``AttributeError: 'NoneType' object has no attribute 'astype'``
  or a ``cv2.error`` naming no file, unpaired folders in a bare ``assert``, a validation GT larger than its
  LQ is cropped silently, an empty set is tested as 0 images and a batch larger than the training set
  trains nothing; each is one DataError naming the file or option (baryir_plugin/data/checks.py).
- ``check_options``: BasicSR reads an option file with bare indexing and ``exec``, and ignores keys it does
  not know, so a typo is a traceback hours in or a silent default; ``parse_options`` of ``basicsr.train``
  and ``basicsr.test`` check the whole file first (baryir_plugin/options_check.py), and a network's or
  loss's constructor error at build time is one OptionError naming its type.

Distributed teardown (barrier + destroy_process_group) lives in :func:`shutdown_distributed`, called by
our command line after BasicSR's pipeline returns.
Set ``BARYIR_COMPAT_SKIP=name1,name2`` to leave named patches out (for reproducing a breakage).
"""
from __future__ import annotations

import collections
import copy
import importlib
import logging
import os
import sys
import tempfile
import time
import types
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from .errors import CheckpointError, OptionError, SetupError, TrainingError, UsageError

_APPLIED: list[str] = []
_ORIGINAL: dict[str, Callable] = {}  # BasicSR's methods that a patch wraps


def _skipped() -> set[str]:
    return {s.strip() for s in os.environ.get('BARYIR_COMPAT_SKIP', '').split(',') if s.strip()}


# --------------------------------------------------------------------------------------------------
# 1. torchvision.transforms.functional_tensor (must run before `import basicsr`)
def _patch_functional_tensor() -> None:
    name = 'torchvision.transforms.functional_tensor'
    if name in sys.modules:
        return
    try:
        importlib.import_module(name)
        return
    except ImportError:
        pass
    try:
        module = importlib.import_module('torchvision.transforms._functional_tensor')
    except ImportError:  # pragma: no cover - torchvision without the private module
        from torchvision.transforms import functional as tvf
        module = types.ModuleType(name)
        module.rgb_to_grayscale = tvf.rgb_to_grayscale
    sys.modules[name] = module


# --------------------------------------------------------------------------------------------------
# 2. resume: device mapping and weights_only loading of training states
def resume_map_location(opt: dict):
    """Where a training state's tensors go: the CUDA device of this rank, or the CPU."""
    if opt.get('num_gpu', 0) != 0 and torch.cuda.is_available():
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def load_training_state(path: str, map_location) -> dict:
    """Load a ``.state`` file with ``weights_only=True`` (the scheduler's Counter allow-listed); an unreadable
    file is a CheckpointError naming it."""
    from .checkpoints import read_training_state
    return read_training_state(path, map_location)


def check_loader_options(opt: dict) -> None:
    """Check the DataLoader options BasicSR's build_dataloader reads from each dataset entry
    (``pin_memory``, ``persistent_workers``), so a slip fails before anything is built, naming the option."""
    for phase, data_opt in (opt.get('datasets') or {}).items():
        if not isinstance(data_opt, dict):
            continue
        for key in ('pin_memory', 'persistent_workers'):
            if key in data_opt and not isinstance(data_opt[key], bool):
                raise OptionError(f'datasets.{phase}.{key} must be true or false, got {data_opt[key]!r}.')
        if not data_opt.get('persistent_workers'):
            continue
        if phase != 'train':
            raise OptionError(f'datasets.{phase}.persistent_workers: BasicSR loads evaluation sets without worker '
                             'processes; drop the option there (it is for datasets.train).')
        if not data_opt.get('num_worker_per_gpu'):
            raise OptionError('datasets.train.persistent_workers: true needs worker processes; set '
                             'num_worker_per_gpu > 0 or drop persistent_workers.')


def _prepare_train_data(opt: dict) -> None:
    """Give the train set the run's seed (per-sample draws, baryir_plugin/data/seeding.py) and check
    the loader options. BasicSR calls load_resume_state after parsing the options and before it builds any
    dataset, with or without a state to resume: the one place to complete the dataset options."""
    check_loader_options(opt)
    train_data = opt.get('datasets', {}).get('train')
    if isinstance(train_data, dict) and opt.get('manual_seed') is not None:
        train_data.setdefault('manual_seed', opt['manual_seed'])  # an explicit dataset-level seed wins


def _load_resume_state(opt: dict):
    from basicsr.utils.misc import check_resume

    from .checkpoints import find_resume_point, network_files, read_training_state, remove_interrupted_saves, \
        set_aside, set_files

    _prepare_train_data(opt)
    paths = opt['path']
    master = opt.get('rank', 0) == 0
    if master:  # a killed save leaves its temporary file; the run it belonged to is over
        root = paths.get('experiments_root')
        remove_interrupted_saves([paths.get('models'), paths.get('training_states'),
                                  root and os.path.join(root, 'metrics')])
    if opt['auto_resume']:
        state_dir = paths.get('training_states') or os.path.join('experiments', opt['name'], 'training_states')
        found = find_resume_point(opt, state_dir, resume_map_location(opt), warn=print if master else _quiet)
        if found is None:
            return None
        path, state, skipped = found
        if master:
            set_aside([f for it in skipped for f in set_files(opt, state_dir, it)])
        if opt.get('dist') and dist.is_initialized():
            dist.barrier()  # no rank reads the folder while rank 0 renames
        paths['resume_state'] = path
    else:
        path = paths.get('resume_state')
        if not path:
            return None
        state = read_training_state(path, resume_map_location(opt), what='path.resume_state')
        missing = [f for f in network_files(opt, int(state['iter'])).values() if not os.path.isfile(f)]
        if missing:
            raise CheckpointError(f'path.resume_state {path} is iteration {state["iter"]}, but its network file(s) '
                                  f'{", ".join(missing)} do not exist: a resumed run reads the networks from this '
                                  f"experiment's models folder (name: {opt['name']}). Resume the experiment that "
                                  'wrote the state, or copy its net_*_<iter>.pth there.')
    total = (opt.get('train') or {}).get('total_iter')
    if isinstance(total, int) and int(state['iter']) >= total:
        raise OptionError(f'the training state is at iteration {state["iter"]} and train.total_iter is {total}: '
                          'nothing is left to train. Raise train.total_iter (e.g. --force_yml train:total_iter='
                          f'{int(state["iter"]) * 2}) or start a new experiment.')
    check_resume(opt, state['iter'])
    train_data = opt.get('datasets', {}).get('train')
    if isinstance(train_data, dict):  # read by ResumableEnlargedSampler through dataset.opt
        train_data['resume_epoch'], train_data['resume_iter'] = int(state['epoch']), int(state['iter'])
    return state


def _quiet(_message: str) -> None:
    pass


def _patch_resume_state() -> None:
    import basicsr.train
    basicsr.train.load_resume_state = _load_resume_state


# --------------------------------------------------------------------------------------------------
# 3. init_dist: NCCL on CUDA, gloo on CPU; no forced 'spawn' on CPU
def dist_backend() -> str:
    """``$BARYIR_DIST_BACKEND`` if set, else ``nccl`` when CUDA is available, else ``gloo``."""
    return os.environ.get('BARYIR_DIST_BACKEND') or ('nccl' if torch.cuda.is_available() else 'gloo')


def _set_start_method(backend: str) -> None:
    import torch.multiprocessing as mp

    # BasicSR forces 'spawn' (needed once CUDA is initialised in the parent); on CPU it only costs a
    # re-import of torch in every DataLoader worker of every epoch.
    method = os.environ.get('BARYIR_MP_START_METHOD') or ('spawn' if backend == 'nccl' else None)
    if method and mp.get_start_method(allow_none=True) is None:
        mp.set_start_method(method)


def _init_dist(launcher: str, backend: str | None = None, **kwargs) -> None:
    from basicsr.utils import dist_util

    backend = backend or dist_backend()
    _set_start_method(backend)
    if launcher == 'pytorch':
        missing = [v for v in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT') if v not in os.environ]
        if missing:
            raise UsageError(f'--launcher pytorch needs the variables torchrun sets ({", ".join(missing)} missing); '
                             'start with `torchrun --nproc_per_node=N -m baryir_plugin train -opt FILE.yml --launcher '
                             'pytorch`, or drop --launcher for one process.')
        if backend == 'nccl':
            torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', os.environ['RANK'])) % torch.cuda.device_count())
        dist.init_process_group(backend=backend, **kwargs)
    elif launcher == 'slurm':
        if backend != 'nccl':
            raise SetupError(f'--launcher slurm sets a CUDA device per task and needs NCCL (backend was {backend!r}); '
                             'on CPU use torchrun with --launcher pytorch.')
        dist_util._init_dist_slurm(backend, **kwargs)
    else:
        raise UsageError(f'--launcher: unknown launcher {launcher!r}; use none, pytorch or slurm.')


def _patch_init_dist() -> None:
    import basicsr.utils.dist_util
    import basicsr.utils.options
    basicsr.utils.dist_util.init_dist = _init_dist
    basicsr.utils.options.init_dist = _init_dist


# --------------------------------------------------------------------------------------------------
# 4. DDP device_ids
def _model_to_device(self, net):
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    net = net.to(self.device)
    if self.opt['dist']:
        device_ids = [torch.cuda.current_device()] if self.device.type == 'cuda' else None
        net = DistributedDataParallel(
            net, device_ids=device_ids, find_unused_parameters=self.opt.get('find_unused_parameters', False))
    elif self.opt['num_gpu'] > 1:
        net = DataParallel(net)
    return net


def _patch_ddp_device_ids() -> None:
    from basicsr.models.base_model import BaseModel
    BaseModel.model_to_device = _model_to_device


# --------------------------------------------------------------------------------------------------
# 5. cv2 JPEG quality must be an int
def add_jpg_compression(img, quality=90):
    """BasicSR's add_jpg_compression with an integer quality and an explicit uint8 conversion.

    OpenCV >= 4.5.4 rejects a float quality; OpenCV 5 also warns on float images and converts them
    itself. Here the [0, 1] image is rounded to uint8 first, which is what older OpenCV did.
    """
    import cv2

    img8 = np.clip(np.rint(np.clip(img, 0, 1) * 255.0), 0, 255).astype(np.uint8)
    ok, encoded = cv2.imencode('.jpg', img8, [int(cv2.IMWRITE_JPEG_QUALITY), int(round(float(quality)))])
    if not ok:
        raise RuntimeError(f'cv2.imencode failed for an image of shape {img8.shape}')
    return np.float32(cv2.imdecode(encoded, 1)) / 255.0


def _patch_jpeg_quality() -> None:
    from basicsr.data import degradations
    degradations.add_jpg_compression = add_jpg_compression


# --------------------------------------------------------------------------------------------------
# 6. CPUPrefetcher: one iterator per epoch, created on first use
class LazyCPUPrefetcher:
    """Drop-in for BasicSR's CPUPrefetcher that creates the loader iterator only when first needed."""

    def __init__(self, loader) -> None:
        self.ori_loader = loader
        self.loader = None

    def next(self):
        if self.loader is None:
            self.loader = iter(self.ori_loader)
        try:
            return next(self.loader)
        except StopIteration:
            return None
        except BaseException:
            # a bad sample ends the run: stop the workers now, not when the traceback's frames are collected
            shutdown = getattr(self.loader, '_shutdown_workers', None)
            if shutdown is not None:
                shutdown()
            self.loader = None
            raise

    def reset(self) -> None:
        self.loader = None


def _patch_lazy_prefetcher() -> None:
    import basicsr.data.prefetch_dataloader
    import basicsr.train
    basicsr.data.prefetch_dataloader.CPUPrefetcher = LazyCPUPrefetcher
    basicsr.train.CPUPrefetcher = LazyCPUPrefetcher


# --------------------------------------------------------------------------------------------------
# 6b. resume continues the epoch where it stopped
def _resumable_sampler_class():
    from basicsr.data.data_sampler import EnlargedSampler

    from .data.seeding import SampleIndex

    class ResumableEnlargedSampler(EnlargedSampler):
        """BasicSR's EnlargedSampler that, after a resume, skips the batches of the resumed epoch that
        were already trained on. BasicSR restarts that epoch from its first batch, so the data seen
        after a resume differs from an uninterrupted run. The position comes from the training state
        (``resume_epoch``/``resume_iter``, put into the dataset's options by the resume patch).

        The indices are BasicSR's (same order, same values) as :class:`SampleIndex` objects, which carry
        the epoch and the slot (the index's value in the epoch's permutation, before ``% len(dataset)``);
        the plugin's datasets seed each sample's draws from them."""

        def __init__(self, dataset, num_replicas, rank, ratio=1):
            super().__init__(dataset, num_replicas, rank, ratio)
            opt = getattr(dataset, 'opt', None)
            opt = opt if isinstance(opt, dict) else {}
            self._resume = (opt.get('resume_epoch'), opt.get('resume_iter'), opt.get('batch_size_per_gpu'))

        def _epoch_indices(self) -> list:
            # EnlargedSampler.__iter__, keeping each slot beside its dataset index
            g = torch.Generator()
            g.manual_seed(self.epoch)
            slots = torch.randperm(self.total_size, generator=g)[self.rank:self.total_size:self.num_replicas]
            size = len(self.dataset)
            return [SampleIndex(slot % size, self.epoch, slot) for slot in slots.tolist()]

        def __iter__(self):
            indices = self._epoch_indices()
            epoch, it, batch = self._resume
            if it is not None and batch and epoch == self.epoch:
                self._resume = (None, None, None)  # only the first resumed epoch is partial
                per_epoch = len(indices) // batch  # BasicSR's train loader drops the last partial batch
                done = it - epoch * per_epoch
                if 0 <= done <= per_epoch:
                    indices = indices[done * batch:]
                else:
                    logging.getLogger('basicsr').warning(
                        f'resume: iteration {it} is not inside epoch {epoch} of {per_epoch} iterations (batch or data '
                        'changed?); the resumed epoch starts from its first batch.')
            return iter(indices)

    return ResumableEnlargedSampler


def _patch_resumable_sampler() -> None:
    import basicsr.train
    basicsr.train.EnlargedSampler = _resumable_sampler_class()


# --------------------------------------------------------------------------------------------------
# 7. any torch.optim optimizer by name
def build_optimizer(optim_type: str, params, lr: float, **kwargs) -> torch.optim.Optimizer:
    cls = getattr(torch.optim, optim_type, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        known = sorted(n for n, c in vars(torch.optim).items() if isinstance(c, type)
                       and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer)
        raise OptionError(f'train.optim_*.type: unknown optimizer {optim_type!r}; use one of {known}.')
    try:
        return cls(params, lr, **kwargs)
    except (TypeError, ValueError) as e:  # torch.optim's own checks: lr < 0, betas out of range, a bad keyword
        raise OptionError(f'train.optim_* ({optim_type}, lr {lr!r}, {kwargs}): {e}; fix the optimizer options.') from e


def _setup_schedulers(self):
    """BaseModel.setup_schedulers with the scheduler's own checks (asserts, TypeErrors) as one OptionError."""
    scheduler = (self.opt.get('train') or {}).get('scheduler')
    if not isinstance(scheduler, dict) or 'type' not in scheduler:
        raise OptionError('train.scheduler is missing or has no type; add e.g. {type: MultiStepLR, milestones: '
                          '[250000, 400000], gamma: 0.5} (or CosineAnnealingRestartLR).')
    given = dict(scheduler)
    try:
        return _ORIGINAL['setup_schedulers'](self)
    except (AssertionError, TypeError, ValueError, KeyError, NotImplementedError) as e:
        self.opt['train']['scheduler'] = given  # BasicSR pops its type
        raise OptionError(f'train.scheduler ({given["type"]}): {e}; fix the scheduler options.') from e


def _get_optimizer(self, optim_type, params, lr, **kwargs):
    return build_optimizer(optim_type, params, lr, **kwargs)


def _patch_optimizers() -> None:
    from basicsr.models.base_model import BaseModel
    BaseModel.get_optimizer = _get_optimizer
    if 'setup_schedulers' not in _ORIGINAL:
        _ORIGINAL['setup_schedulers'] = BaseModel.setup_schedulers
    BaseModel.setup_schedulers = _setup_schedulers


# --------------------------------------------------------------------------------------------------
# 8. atomic checkpoint writes
def _file_mode() -> int:
    """The mode a plain ``open(path, 'w')`` would give a new file (0o666 less the umask); mkstemp's is 0o600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str, write) -> None:
    """Call ``write(binary_file)`` on a temporary file in the same folder, then rename it over ``path``:
    a crash or an error leaves the previous file (or none), never a truncated one. An OSError names
    ``path`` (not the temporary file)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        if os.path.isdir(path):
            raise IsADirectoryError(21, 'Is a directory (give a file name inside it)', path)
        fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
        os.chmod(tmp, _file_mode())
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename is not None and e.filename != path and e.errno is not None:
            raise type(e)(e.errno, e.strerror, path) from e
        raise


def atomic_torch_save(obj, path: str) -> None:
    """torch.save through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


class _TorchWithAtomicSave(types.ModuleType):
    """``torch`` as seen by basicsr.models.base_model, except that ``save`` is atomic."""

    def __init__(self) -> None:
        super().__init__('torch')

    def __getattr__(self, name: str):
        return getattr(torch, name)

    save = staticmethod(atomic_torch_save)


def _patch_atomic_save() -> None:
    import basicsr.models.base_model as base_model
    if not isinstance(base_model.torch, _TorchWithAtomicSave):
        base_model.torch = _TorchWithAtomicSave()


# --------------------------------------------------------------------------------------------------
# 8b. archived experiment folders never collide
def mkdir_and_rename(path: str) -> None:
    """BasicSR's mkdir_and_rename (an existing folder is renamed ``<path>_archived_<time>`` and a new one
    made), with ``_2``, ``_3`` ... added when a folder of that second was archived already: BasicSR's
    rename then fails on the existing archive (two runs of one name within a second)."""
    from basicsr.utils.misc import get_time_str

    if os.path.exists(path):
        base = new_name = f'{path}_archived_{get_time_str()}'
        n = 1
        while os.path.exists(new_name):
            n += 1
            new_name = f'{base}_{n}'
        print(f'Path already exists. Rename it to {new_name}', flush=True)
        os.rename(path, new_name)
    os.makedirs(path, exist_ok=True)


def _patch_archive_names() -> None:
    import basicsr.train
    import basicsr.utils
    import basicsr.utils.misc
    for module in (basicsr.utils.misc, basicsr.utils, basicsr.train):
        module.mkdir_and_rename = mkdir_and_rename


# --------------------------------------------------------------------------------------------------
# 9. checkpoints: clear errors on load, no non-finite weights on save
def _load_network(self, net, load_path, strict=True, param_key='params'):
    """BaseModel.load_network reading through :func:`baryir_plugin.checkpoints.read_checkpoint`: a missing,
    truncated or foreign file, an absent ``param_key`` or weights that do not fit the network are one
    CheckpointError naming the file and the fix."""
    from basicsr.utils import get_root_logger

    from .checkpoints import check_network_file, read_checkpoint, state_dict_mismatch

    bare = self.get_bare_model(net)
    option = next((f'path.{k}' for k, v in (self.opt.get('path') or {}).items()
                   if k.startswith('pretrain_network') and v == load_path), None)
    label = f'{option} ({type(bare).__name__})' if option else f'the {type(bare).__name__} checkpoint'
    load_net = read_checkpoint(load_path, label)
    if param_key is not None:
        check_network_file(load_net, label, load_path, 'give it as path.resume_state, or give the '
                           'models/net_*_<iter>.pth saved with it')
        if param_key not in load_net and 'params' in load_net:
            get_root_logger().warning(f'{label} {load_path} has no {param_key!r} weights (was it trained without '
                                      "EMA?); loading 'params' instead.")
            param_key = 'params'
        if param_key not in load_net:
            keys = [k for k in load_net if not torch.is_tensor(load_net[k])][:6]
            raise CheckpointError(f'{label} {load_path} has no {param_key!r} entry (it has '
                                  f'{keys or sorted(load_net)[:6]}); set path.param_key_* to one of them.')
        load_net = load_net[param_key]
    if not isinstance(load_net, dict) or not all(torch.is_tensor(v) for v in load_net.values()):
        raise CheckpointError(f'{label} {load_path} is not a state_dict of tensors.')
    get_root_logger().info(f'Loading {type(bare).__name__} model from {load_path}, with param key: [{param_key}].')
    load_net = collections.OrderedDict((k[7:] if k.startswith('module.') else k, v) for k, v in load_net.items())
    self._print_different_keys_loading(bare, load_net, strict)
    try:
        bare.load_state_dict(load_net, strict=strict)
    except RuntimeError as e:
        detail, shapes = state_dict_mismatch(bare.state_dict(), load_net)
        detail = detail or ' '.join(str(e).split())[:200]
        fix = 'give the network options it was trained with'
        if not shapes and strict:
            fix += ', or set path.strict_load_*: false to load the matching part'
        raise CheckpointError(f'{label} {load_path} does not fit the network built from the options ({detail}); '
                              f'{fix}.') from None


SAVE_ATTEMPTS, SAVE_RETRY_S = 3, 1.0  # a network file that cannot be written (BasicSR's own retry count)


def _save_network(self, net, net_label, current_iter, param_key='params'):
    """BaseModel.save_network that writes the network options beside the weights and refuses weights holding NaN/inf: the previous checkpoint is kept, and the
    training state of this iteration is not written either (a resume then falls back to a complete set)."""
    from basicsr.utils import get_root_logger

    from .checkpoints import NETWORK_OPTIONS_KEY, nonfinite_tensors

    nets = net if isinstance(net, list) else [net]
    bad = nonfinite_tensors(t for n in nets for t in self.get_bare_model(n).state_dict().values())
    if bad:
        self._refused_save_iter = current_iter
        name = f'{net_label}_{"latest" if current_iter == -1 else current_iter}.pth'
        get_root_logger().error(f'Not saving {name}: {bad} weight tensor(s) of it hold NaN/inf (the training '
                                'diverged); the previous checkpoints are kept.')
        if current_iter == -1:  # the end of training: its result was refused, so the run did not succeed
            raise TrainingError(f'training ended, but {name} was not saved: its weights hold NaN/inf (the training '
                                'diverged). Lower the learning rate (train.optim_*.lr) or check the data for extreme '
                                'values, and resume from the last checkpoint in the models folder.')
        return
    keys = param_key if isinstance(param_key, list) else [param_key]
    if len(keys) != len(nets):
        raise ValueError(f'save_network: {len(nets)} network(s) but {len(keys)} param_key(s).')
    save_dict = {}
    for net_, key in zip(nets, keys):
        state = self.get_bare_model(net_).state_dict()
        save_dict[key] = collections.OrderedDict((k[7:] if k.startswith('module.') else k, v.detach().cpu())
                                                 for k, v in state.items())
    options = self.opt.get(f'network_{net_label[len("net_"):]}') if net_label.startswith('net_') else None
    if isinstance(options, dict) and options.get('type'):
        # the network's options beside its weights: `baryir infer` and friends need no option file
        save_dict[NETWORK_OPTIONS_KEY] = copy.deepcopy(dict(options))
    name = f'{net_label}_{"latest" if current_iter == -1 else current_iter}.pth'
    path = os.path.join(self.opt['path']['models'], name)
    for attempt in range(1, SAVE_ATTEMPTS + 1):
        try:
            atomic_torch_save(save_dict, path)  # a failed try leaves the previous file as it was
            return
        except OSError as e:
            if attempt == SAVE_ATTEMPTS:
                raise  # BasicSR would log and go on training without its checkpoint; the error names the file
            get_root_logger().warning(f'Could not save {path} ({e}); trying again ({attempt}/{SAVE_ATTEMPTS}).')
            time.sleep(SAVE_RETRY_S)


def _save_training_state(self, epoch, current_iter):
    if getattr(self, '_refused_save_iter', None) == current_iter:
        return  # its networks were not written: a state without them would be an incomplete set
    return _ORIGINAL['save_training_state'](self, epoch, current_iter)


def _resume_training(self, resume_state):
    """BaseModel.resume_training, with a state written by another model (other optimizers or schedulers)
    one CheckpointError instead of BasicSR's assert."""

    for key, have in (('optimizers', self.optimizers), ('schedulers', self.schedulers)):
        saved = resume_state.get(key)
        if not isinstance(saved, list) or len(saved) != len(have):
            count = len(saved) if isinstance(saved, list) else 'no'
            raise CheckpointError(f'resume: the training state holds {count} {key}, this {type(self).__name__} has '
                                  f'{len(have)}; it was written by another model_type or optimizer set-up. Resume with '
                                  'the options it was trained with.')
    return _ORIGINAL['resume_training'](self, resume_state)


def _patch_checkpoints() -> None:
    from basicsr.models.base_model import BaseModel
    if 'resume_training' not in _ORIGINAL:
        _ORIGINAL['resume_training'] = BaseModel.resume_training
    BaseModel.resume_training = _resume_training
    if 'save_network' not in _ORIGINAL:
        _ORIGINAL['save_network'] = BaseModel.save_network
        _ORIGINAL['save_training_state'] = BaseModel.save_training_state
    BaseModel.load_network = _load_network
    BaseModel.save_network = _save_network
    BaseModel.save_training_state = _save_training_state



# --------------------------------------------------------------------------------------------------
def shutdown_distributed() -> None:
    """Synchronise all ranks and destroy the process group (BasicSR never does).

    Without it, ranks that skip validation reach interpreter exit while rank 0 still works, which
    intermittently aborts gloo runs ('terminate called without an active exception').
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


_PATCHES: list[tuple[str, Callable[[], None]]] = [
    ('functional_tensor', _patch_functional_tensor),
    ('resume_state', _patch_resume_state),
    ('init_dist', _patch_init_dist),
    ('ddp_device_ids', _patch_ddp_device_ids),
    ('jpeg_quality', _patch_jpeg_quality),
    ('lazy_prefetcher', _patch_lazy_prefetcher),
    ('resume_position', _patch_resumable_sampler),
    ('optimizers', _patch_optimizers),
    ('atomic_save', _patch_atomic_save),
    ('archive_names', _patch_archive_names),
    ('checkpoints', _patch_checkpoints),
    ('data_checks', lambda: importlib.import_module('.data.checks', __package__).patch()),
    ('check_options', lambda: importlib.import_module('.options_check', __package__).install()),
]
PATCH_NAMES = tuple(name for name, _ in _PATCHES)


def apply() -> list[str]:
    """Apply every patch not listed in ``$BARYIR_COMPAT_SKIP``; idempotent. Returns the applied names."""
    skip = _skipped()
    unknown = skip - set(PATCH_NAMES)
    if unknown:
        raise ValueError(f'BARYIR_COMPAT_SKIP: unknown patch names {sorted(unknown)}; known: {list(PATCH_NAMES)}.')
    for name, patch in _PATCHES:
        if name in skip or name in _APPLIED:
            continue
        patch()
        _APPLIED.append(name)
    logging.getLogger('baryir_plugin').debug('compat patches applied: %s', _APPLIED)
    return list(_APPLIED)


def applied() -> list[str]:
    return list(_APPLIED)

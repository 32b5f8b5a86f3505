"""Reading checkpoints safely, refusing to write broken ones, and finding the newest complete training
state to resume from.

- :func:`read_checkpoint` loads a ``.pth``/``.state`` with ``weights_only=True`` and turns every way a
  file can be broken (missing, empty, truncated, not a torch file, pickled code) into one
  :class:`~baryir_plugin.errors.CheckpointError` that names the file.
- :func:`nonfinite_tensors` says whether weights about to be saved hold NaN/inf (such a checkpoint is
  never written: the previous one is kept).
- :func:`find_resume_point` picks, for ``--auto_resume``, the newest iteration whose training state AND
  network files all load, warning about each newer one that does not; :func:`set_aside` renames the
  files of those (``*.unusable``) so that the resumed run, saving the same iterations again, overwrites
  nothing. Nothing is ever deleted.
- :func:`remove_interrupted_saves` removes the temporary files a killed save leaves behind (our own
  naming pattern only: ``.<name>.<8 random characters>.tmp`` beside the file).
"""
from __future__ import annotations

import collections
import os
import pickle
import re
import zipfile
from typing import Callable, Iterable, Optional

import torch

from baryir_plugin.errors import CheckpointError

# Where a BasicSR .pth written by this package keeps the options of the network beside its weights
# ({'params': ..., 'baryir_config': {'type': 'BaryIR', ...}}): enough to build it without an option file.
NETWORK_OPTIONS_KEY = 'baryir_config'
# compat.atomic_write's temporary files: tempfile.mkstemp(prefix='.' + name + '.', suffix='.tmp')
_TEMP_FILE = re.compile(r'^\.(?P<name>.+\.(?:pth|state|json|csv))\.[a-z0-9_]{8}\.tmp$')


def why_unreadable(exc: BaseException) -> str:
    text = str(exc)
    if any(s in text for s in ('Unsupported global', 'Unsupported class', 'unsupported GLOBAL')):
        return ('it holds pickled objects, not only tensors (an official release checkpoint? convert it with '
                '`baryir convert-official`; otherwise re-save its state_dict)')
    if isinstance(exc, (EOFError, zipfile.BadZipFile, OSError)) or any(
            s in text for s in ('PytorchStreamReader', 'zip archive', 'central directory', 'miniz', 'unexpected EOF')):
        return 'it is truncated or corrupt (an interrupted copy or save?)'
    if isinstance(exc, pickle.UnpicklingError) or 'invalid load key' in text or 'Unsupported operand' in text:
        return 'it is not a torch checkpoint'
    return f'it is not a torch checkpoint ({type(exc).__name__}: {" ".join(text.split())[:160]})'


def read_checkpoint(path: str, what: str = 'checkpoint', map_location='cpu', allow: Iterable[type] = ()) -> object:
    """``torch.load(path, weights_only=True)`` (with ``allow`` allow-listed); any unreadable file is a
    CheckpointError naming ``what`` (the option or role, e.g. ``path.pretrain_network_g``) and the file."""
    if not os.path.exists(path):
        raise CheckpointError(f'{what} {path}: no such file; fix the path (relative to {os.getcwd()}).')
    if os.path.isdir(path):
        raise CheckpointError(f'{what} {path} is a folder; give the .pth/.state file inside it.')
    if os.path.getsize(path) == 0:
        raise CheckpointError(f'{what} {path} is empty (0 bytes; an interrupted copy or save?); replace it.')
    safe = getattr(torch.serialization, 'safe_globals', None)
    try:
        if safe is None or not allow:
            return torch.load(path, map_location=map_location, weights_only=True)
        with safe(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, KeyError, OSError,
            AttributeError, ImportError, TypeError, IndexError, OverflowError, UnicodeDecodeError) as e:
        raise CheckpointError(f'{what} {path} cannot be read: {why_unreadable(e)}.') from e
    except Exception as e:  # noqa: BLE001 (torch.load hands some files to other readers, e.g. safetensors)
        if type(e).__module__.split('.')[0] in ('torch', 'baryir_plugin', 'builtins'):
            raise
        raise CheckpointError(f'{what} {path} cannot be read: {why_unreadable(e)}.') from e


def check_network_file(obj: object, label: str, path: str, state_fix: str) -> dict:
    """A loaded network file (a dict of entries such as 'params'); a CheckpointError naming ``label`` and
    ``path`` when it is something else, a training state among them (``state_fix``: what to give instead)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f'{label} {path} holds a {type(obj).__name__}, not network weights; save '
                              '{"params": net.state_dict()}.')
    if {'iter', 'optimizers'} <= set(obj):
        raise CheckpointError(f'{label} {path} is a training state (.state), not network weights; {state_fix}.')
    return obj


def state_dict_mismatch(have: dict, got: dict) -> tuple[str, list[str]]:
    """Why ``got`` does not load into a network whose state dict is ``have``: ``('missing: a, b ... (5); other
    shape: c (1)', the keys of other shape)``; an empty text when the keys and shapes all match."""
    missing = sorted(set(have) - set(got))
    unexpected = sorted(set(got) - set(have))
    shapes = [k for k, v in got.items() if k in have and have[k].shape != v.shape]
    detail = '; '.join(f'{name}: {", ".join(keys[:3])}{" ..." if len(keys) > 3 else ""} ({len(keys)})'
                       for name, keys in (('missing', missing), ('unexpected', unexpected), ('other shape', shapes))
                       if keys)
    return detail, shapes


def read_training_state(path: str, map_location='cpu', what: str = 'training state') -> dict:
    """A BasicSR ``.state`` file (the schedulers' Counter allow-listed), checked to be one."""
    state = read_checkpoint(path, what, map_location, allow=[collections.Counter])
    if not isinstance(state, dict) or not {'iter', 'epoch', 'optimizers', 'schedulers'} <= set(state):
        raise CheckpointError(f'{what} {path} is not a BasicSR training state (no iter/epoch/optimizers/'
                              'schedulers); give a .state file from experiments/<name>/training_states.')
    return state


def nonfinite_tensors(tensors: Iterable[torch.Tensor]) -> int:
    """How many of the floating-point tensors hold a NaN or an infinity (one host sync in all)."""
    flags = [~torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point()]
    return int(torch.stack(flags).sum()) if flags else 0


def state_dict_tensors(state: dict) -> list[torch.Tensor]:
    """Every tensor of a (possibly nested) save dict."""
    out = []
    for value in state.values():
        if torch.is_tensor(value):
            out.append(value)
        elif isinstance(value, dict):
            out.extend(state_dict_tensors(value))
    return out


def remove_interrupted_saves(folders: Iterable[str], say: Callable[[str], None] = print) -> list[str]:
    """Delete the temporary files of interrupted saves (our pattern only) in ``folders``; returns them."""
    removed = []
    for folder in folders:
        if not folder or not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if _TEMP_FILE.match(name):
                path = os.path.join(folder, name)
                try:
                    os.remove(path)
                except OSError as e:
                    say(f'Could not remove the leftover temporary file {path} ({e.strerror}).')
                    continue
                removed.append(path)
                say(f'Removed {path}, left by an interrupted save.')
    return removed


def network_files(opt: dict, iteration: int) -> dict[str, str]:
    """The network files BasicSR's check_resume loads for ``iteration``: ``{network_x: models/net_x_<it>.pth}``."""
    ignored = opt['path'].get('ignore_resume_networks') or []
    models = opt['path']['models']
    return {key: os.path.join(models, f'net_{key[len("network_"):]}_{iteration}.pth')
            for key in opt if key.startswith('network_') and key not in ignored}


def set_files(opt: dict, state_dir: str, iteration: int) -> list[str]:
    """The files of one saved iteration that exist: its training state and its network files."""
    files = [os.path.join(state_dir, f'{iteration}.state'), *network_files(opt, iteration).values()]
    return [f for f in files if os.path.exists(f)]


def find_resume_point(opt: dict, state_dir: str, map_location='cpu',
                      warn: Callable[[str], None] = print) -> Optional[tuple[str, dict, list[int]]]:
    """The newest ``(state path, state, skipped iterations)`` in ``state_dir`` whose state and network
    files all load; ``skipped``: the newer iterations that did not, each named in a warning.

    None when the folder holds no state; a CheckpointError when it holds states but none is complete."""
    if not os.path.isdir(state_dir):
        return None
    iterations = sorted((int(stem) for stem, ext in map(os.path.splitext, os.listdir(state_dir))
                         if ext == '.state' and stem.isdigit()), reverse=True)
    problems, skipped = [], []
    for it in iterations:
        path = os.path.join(state_dir, f'{it}.state')
        try:
            state = read_training_state(path, map_location)
            if int(state['iter']) != it:
                raise CheckpointError(f'training state {path} says iteration {state["iter"]}, not {it}')
            for key, net_path in network_files(opt, it).items():
                weights = read_checkpoint(net_path, f'{key} of iteration {it}')
                if isinstance(weights, dict) and nonfinite_tensors(state_dict_tensors(weights)):
                    raise CheckpointError(f'{key} of iteration {it} {net_path} holds non-finite weights')
        except CheckpointError as e:
            problems.append(str(e).rstrip('.'))
            skipped.append(it)
            warn(f'auto_resume: skipping iteration {it}: {problems[-1]}.')
            continue
        return path, state, skipped
    if problems:
        raise CheckpointError(f'--auto_resume: no complete training state in {state_dir} ({len(problems)} found, '
                              f'none usable; newest: {problems[0]}); restore the files, or give path.resume_state '
                              'explicitly, or start afresh without --auto_resume (the old run is kept as '
                              '*_archived_*).')
    return None


def set_aside(paths: Iterable[str], suffix: str = '.unusable', say: Callable[[str], None] = print) -> list[str]:
    """Rename files to ``<name><suffix>`` (``<name><suffix>.1`` ... when taken): kept, but out of the way of
    the files a resumed run writes under the same names. Returns the new names."""
    moved = []
    for path in paths:
        target, n = path + suffix, 0
        while os.path.exists(target):
            n += 1
            target = f'{path}{suffix}.{n}'
        os.replace(path, target)
        moved.append(target)
    if moved:
        say(f'auto_resume: kept the files of the skipped iteration(s) as {", ".join(moved)}; the resumed run '
            'writes those iterations afresh.')
    return moved

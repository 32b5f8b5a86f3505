"""What a benchmark ran on, printed beside its figures, and whether the device a script was asked for is there."""
from __future__ import annotations

import os
import platform
import resource

import torch

from ..errors import UsageError

DEVICE_TYPES = ('cpu', 'cuda')
NO_GPU_HINT = 'use --device cpu, or run on a machine with a CUDA GPU'


def check_device(text: str, flag: str = '--device', hint: str = NO_GPU_HINT) -> str:
    """``text`` if it is a torch device string of a supported type (cpu, cuda, cuda:N) that this machine
    has; otherwise a UsageError naming ``flag`` (``hint``: the fix when the GPU is missing). Call it before
    any work: torch itself fails late, with a message that names no flag."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f'{flag} {text!r} is not a torch device; give cpu, cuda or cuda:N (N: the GPU index).') \
            from None
    if device.type not in DEVICE_TYPES:
        raise UsageError(f'{flag} {text!r}: {device.type} devices are not supported here; give cpu, cuda or cuda:N.')
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            why = 'this torch is a CPU-only build' if torch.version.cuda is None else 'no GPU or driver was found'
            raise UsageError(f'{flag} {text}: no CUDA device is visible to torch here ({why}); {hint}.')
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f'{flag} {text}: torch sees {count} CUDA device(s) here (cuda:0 to cuda:{count - 1}); '
                             f'give one of them, or {hint}.')
    return text


def machine_line(device: str = 'cpu') -> str:
    """Host, CPU model, core and thread counts, Python and torch versions, and the GPU when used."""
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    text = (f'{platform.node()} | {cpu} | {os.cpu_count()} cores, torch threads {torch.get_num_threads()} | '
            f'python {platform.python_version()} | torch {torch.__version__}')
    if str(device).startswith('cuda') and torch.cuda.is_available():
        index = torch.device(device).index
        text += f' | {torch.cuda.get_device_name(index)} (CUDA {torch.version.cuda})'
    return text


def peak_memory_mib(device: str = 'cpu') -> float:
    """torch.cuda.max_memory_allocated on a GPU; the process's peak resident set size on the CPU."""
    if str(device).startswith('cuda'):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

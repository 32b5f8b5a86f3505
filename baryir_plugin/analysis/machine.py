"""What a benchmark ran on, printed beside its figures."""
from __future__ import annotations

import os
import platform
import resource

import torch


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
        text += f' | {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})'
    return text


def peak_memory_mib(device: str = 'cpu') -> float:
    """torch.cuda.max_memory_allocated on a GPU; the process's peak resident set size on the CPU."""
    if str(device).startswith('cuda'):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

"""Measurement helpers shared by the benchmark scripts: the machine line and the training-step benchmark."""
from .machine import machine_line, peak_memory_mib
from .train_benchmark import BenchConfig, mode_options, run_mode

__all__ = ['BenchConfig', 'machine_line', 'mode_options', 'peak_memory_mib', 'run_mode']

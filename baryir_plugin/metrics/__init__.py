"""Metrics registered in BasicSR's METRIC_REGISTRY (use them by ``type`` under ``val.metrics``).

- ``calculate_piqe``: PIQE, no reference, lower is better (:mod:`.piqe`; the array-level function with
  the masks is ``baryir_plugin.metrics.piqe.piqe``).
- ``calculate_lpips``: LPIPS-Alex v0.1 from local weight files, lower is better (:mod:`.lpips`).

BasicSR's own ``calculate_psnr``, ``calculate_ssim`` and ``calculate_niqe`` stay available as they are.
"""
# The functions piqe() and lpips are not re-exported here: the names would shadow the submodules
# (``baryir_plugin.metrics.piqe`` must stay the module).
from .lpips import LPIPSAlex, calculate_lpips, load_lpips_alex
from .piqe import PIQEResult, calculate_piqe, rgb2gray_matlab

__all__ = ['LPIPSAlex', 'PIQEResult', 'calculate_lpips', 'calculate_piqe', 'load_lpips_alex', 'rgb2gray_matlab']

"""BaryIR for BasicSR: importing this package registers BaryIR's classes in BasicSR's registries.

``import baryir_plugin`` before BasicSR builds anything is all a third-party script needs; our
``basicsr``/``baryir`` commands do it for you.
"""
from . import compat

compat.apply()  # must run before the first `import basicsr`

from . import archs, data, losses, metrics, models  # noqa: E402  (registers archs, datasets, losses, metrics, models)
from .version import __version__  # noqa: E402

__all__ = ['archs', 'compat', 'data', 'losses', 'metrics', 'models', '__version__']

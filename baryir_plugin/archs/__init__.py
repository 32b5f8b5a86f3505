"""Networks registered in BasicSR's ARCH_REGISTRY."""
from .baryir_arch import BaryIR
from .potentials_arch import BarycenterPotentials

__all__ = ['BaryIR', 'BarycenterPotentials']

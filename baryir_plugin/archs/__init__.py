"""Networks registered in BasicSR's ARCH_REGISTRY."""
from .backbones import BACKBONE_REGISTRY, NAFNetBackbone, PromptIRBackbone, RestormerBackbone, UNetBackbone
from .barycenter_map import BarycenterMap
from .baryir_arch import BaryIR
from .darcot_arch import DARCOT
from .darcot_potential_arch import DARCOTPotential
from .potentials_arch import BarycenterPotentials

__all__ = ['BACKBONE_REGISTRY', 'BaryIR', 'BarycenterMap', 'BarycenterPotentials', 'NAFNetBackbone', 'PromptIRBackbone',
           'RestormerBackbone', 'UNetBackbone', 'DARCOT', 'DARCOTPotential']

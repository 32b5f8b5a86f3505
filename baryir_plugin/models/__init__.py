"""Models registered in BasicSR's MODEL_REGISTRY."""
from .baryir_model import BaryIRModel, barycenter_weights
from .darcot_model import DARCOTModel

__all__ = ['BaryIRModel', 'DARCOTModel', 'barycenter_weights']

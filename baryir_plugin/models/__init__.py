"""Models registered in BasicSR's MODEL_REGISTRY."""
from .baryir_model import BaryIRModel, barycenter_weights

__all__ = ['BaryIRModel', 'barycenter_weights']

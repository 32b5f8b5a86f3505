"""U-Net backbones the barycenter framework (BaryIR) sits on: the interface and the registered ones."""
from .base import BACKBONE_REGISTRY, ConvBlock, UNetBackbone, UpsampleTo, build_backbone
from .nafnet import NAFBlock, NAFNetBackbone
from .promptir import PromptGenBlock, PromptIRBackbone
from .restormer import RestormerBackbone

__all__ = ['BACKBONE_REGISTRY', 'ConvBlock', 'NAFBlock', 'NAFNetBackbone', 'PromptGenBlock', 'PromptIRBackbone',
           'RestormerBackbone', 'UNetBackbone', 'UpsampleTo', 'build_backbone']

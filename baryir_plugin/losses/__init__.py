"""Losses registered in BasicSR's LOSS_REGISTRY."""
from .barycenter_losses import BROLoss, IRCLoss, MWBLoss, PotentialLoss, TransportCostLoss, transport_cost
from .darcot_losses import FourierResidualLoss, FROTCostLoss, ResidualContrastiveLoss, WGANGPLoss, frot_cost

__all__ = ['BROLoss', 'IRCLoss', 'MWBLoss', 'PotentialLoss', 'TransportCostLoss', 'transport_cost',
           'FourierResidualLoss', 'FROTCostLoss', 'ResidualContrastiveLoss', 'WGANGPLoss', 'frot_cost']

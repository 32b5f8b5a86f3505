"""Losses registered in BasicSR's LOSS_REGISTRY."""
from .barycenter_losses import BROLoss, IRCLoss, MWBLoss, PotentialLoss, TransportCostLoss, transport_cost

__all__ = ['BROLoss', 'IRCLoss', 'MWBLoss', 'PotentialLoss', 'TransportCostLoss', 'transport_cost']

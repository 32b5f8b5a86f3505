"""Datasets registered in BasicSR's DATASET_REGISTRY."""
from .all_in_one_dataset import AllInOneDataset
from .degradations import DEGRADATIONS, degrade, gaussian_noise
from .noise_dataset import GaussianNoiseDataset

__all__ = ['AllInOneDataset', 'DEGRADATIONS', 'GaussianNoiseDataset', 'degrade', 'gaussian_noise']

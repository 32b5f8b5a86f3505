"""Datasets registered in BasicSR's DATASET_REGISTRY."""
from .all_in_one_dataset import AllInOneDataset
from .degradations import DEGRADATIONS, degrade, gaussian_noise
from .jpeg_dataset import JPEGCompressionDataset
from .noise_dataset import GaussianNoiseDataset
from .seeding import SampleIndex
from .stem_matched_dataset import StemMatchedPairedDataset

__all__ = ['AllInOneDataset', 'DEGRADATIONS', 'GaussianNoiseDataset', 'JPEGCompressionDataset', 'SampleIndex',
           'StemMatchedPairedDataset', 'degrade', 'gaussian_noise']

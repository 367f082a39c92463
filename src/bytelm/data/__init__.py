"""Byte data: files and folders read as one memory-mapped stream, a deterministic train/validation split, and random
training windows. Knows nothing of models."""

from .corpus import default_corpus_files, load_split
from .dataset import ByteDataset
from .sampler import WindowSampler

__all__ = ["ByteDataset", "WindowSampler", "default_corpus_files", "load_split"]

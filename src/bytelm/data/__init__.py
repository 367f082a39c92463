"""Byte data: files and folders read as one memory-mapped stream (or decoded to raw pixels and samples: images and
audio), a deterministic train/validation split, and random training windows. Knows nothing of models."""

from .corpus import default_corpus_files, load_split, resolve_media
from .dataset import ByteDataset
from .media import AudioFormat, ImageFormat, Media, parse_modality
from .sampler import WindowSampler

__all__ = ["AudioFormat", "ByteDataset", "ImageFormat", "Media", "WindowSampler", "default_corpus_files", "load_split",
           "parse_modality", "resolve_media"]

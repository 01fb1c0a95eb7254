"""Saving pruned models smaller than dense, and loading them back exactly (format: FORMAT.md)."""

from .codecs import decode, encode, layout_of
from .inspection import inspect, inspect_main
from .loader import CompressedLinear, load
from .reader import Checkpoint
from .save import save_pruned
from .writer import CheckpointWriter

__all__ = [
    "Checkpoint",
    "CheckpointWriter",
    "CompressedLinear",
    "decode",
    "encode",
    "inspect",
    "inspect_main",
    "layout_of",
    "load",
    "save_pruned",
]

"""Readers and writers: safetensors files, checkpoint directories, trajectory layouts, saved fits."""

from .checkpoint import Checkpoint
from .reader import SafetensorsFile, TensorInfo
from .writer import ShardedWriter, TensorSpec, write_checkpoint

__all__ = ["Checkpoint", "SafetensorsFile", "TensorInfo", "ShardedWriter", "TensorSpec", "write_checkpoint"]

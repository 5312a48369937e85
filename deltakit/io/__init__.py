"""Checkpoint I/O: lazy, memory-mapped safetensors reading and atomic sharded writing."""

from deltakit.io.checkpoint import Checkpoint, TensorMeta
from deltakit.io.writer import SafetensorsWriter, ShardedWriter, TensorSpec, atomic_output_dir

__all__ = ["Checkpoint", "TensorMeta", "SafetensorsWriter", "ShardedWriter", "TensorSpec", "atomic_output_dir"]

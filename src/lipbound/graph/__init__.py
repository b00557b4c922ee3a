"""Capture a model's computation graph and simplify it (see :mod:`lipbound.graph.types`)."""

from __future__ import annotations

from .capture import capture
from .chain import sequential_chain
from .simplify import simplify
from .types import Node, NodeKind, OpGraph

__all__ = ["Node", "NodeKind", "OpGraph", "capture", "sequential_chain", "simplify"]

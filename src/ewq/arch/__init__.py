"""Architecture map: tensor name -> (exec_index, role), from data tables."""

from ewq.arch.layout import Block, ModelLayout, resolve
from ewq.arch.registry import load_tables

__all__ = ["Block", "ModelLayout", "load_tables", "resolve"]

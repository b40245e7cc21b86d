"""Planning: budgets and clusters (budget), exact block sizes (sizes), Algorithm 1
and placement (ladder), and the runtimes' syntax for a placement (exports)."""

from ewq.planning.allocate import Option, allocate
from ewq.planning.budget import (
    BudgetError,
    Machine,
    load_cluster,
    parse_size,
    single_machine,
)
from ewq.planning.exports import exports
from ewq.planning.ladder import MODES, Assignment, BlockSpec, FitResult, fit
from ewq.planning.optimal import fit_optimal
from ewq.planning.placement import Route
from ewq.planning.runtime import Runtime, model_dims, route_for, runtime_memory
from ewq.planning.sizes import block_specs

__all__ = [
    "MODES",
    "Option",
    "Route",
    "Runtime",
    "model_dims",
    "route_for",
    "allocate",
    "fit_optimal",
    "runtime_memory",
    "Assignment",
    "BlockSpec",
    "BudgetError",
    "FitResult",
    "Machine",
    "block_specs",
    "exports",
    "fit",
    "load_cluster",
    "parse_size",
    "single_machine",
]

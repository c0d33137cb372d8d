"""Module type → rule. Exact types only: a subclass may change ``forward`` and must register."""
from __future__ import annotations

from torch import nn

from .base import Rule
from .conv import ConvRule
from .elementwise import ACTIVATIONS, PAIRS, DropoutRule, ElementwiseRule
from .embedding import EmbeddingRule
from .linear import LinearRule
from .normalization import BatchNormRule, LayerNormRule
from .pooling import ADAPTIVE_AVG_POOL_DIMS, AdaptiveAvgPoolRule, AvgPoolRule, MaxPoolRule
from .shape import ReshapeRule

_RULES: dict[type[nn.Module], Rule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.MaxPool2d: MaxPoolRule(),
    nn.AvgPool2d: AvgPoolRule(),
    **{t: AdaptiveAvgPoolRule() for t in ADAPTIVE_AVG_POOL_DIMS},
    nn.LayerNorm: LayerNormRule(),
    nn.BatchNorm1d: BatchNormRule(),
    nn.BatchNorm2d: BatchNormRule(),
    nn.Embedding: EmbeddingRule(),
    nn.Flatten: ReshapeRule(),
    nn.Unflatten: ReshapeRule(),
    nn.Identity: ReshapeRule(),
    nn.Dropout: DropoutRule(),
    **{t: ElementwiseRule(first, second, PAIRS.get(t)) for t, (first, second) in ACTIVATIONS.items()},
}


#: module types rejected on purpose (qualified name, so nothing is imported) → why
_REJECTED = {
    "sb3_contrib.common.torch_layers.BatchRenorm1d": (
        "its forward updates the running statistics from which it derives the renormalisation "
        "(r, d) it applied, so no rule can recover the normalisation that forward used; "
        "nn.BatchNorm1d is supported"
    ),
}


CORE_WAY_OUT = (
    "Add one with hesscale.register_rule(type, rule), or capture fewer modules "
    "(hessian_diagonal(..., modules=[...]))."
)


class UnsupportedModuleError(TypeError):
    """A module inside a captured set has no HesScale rule.

    The message names the module's attribute ``path``, its type, the supported types and a way
    out; callers with another way out (the agents: a first-order optimizer) use
    :meth:`with_way_out`.
    """

    def __init__(self, path: str, module_type: type, way_out: str = CORE_WAY_OUT):
        self.path, self.module_type, self.way_out = path, module_type, way_out
        reason = _REJECTED.get(f"{module_type.__module__}.{module_type.__qualname__}")
        super().__init__(
            f"module {path or '<root>'!r} of type {module_type.__name__} has no HesScale rule"
            f"{f' ({reason})' if reason else ''}. Supported: {', '.join(supported_types())}. {way_out}"
        )

    def with_way_out(self, way_out: str) -> "UnsupportedModuleError":
        return UnsupportedModuleError(self.path, self.module_type, way_out)

    def __reduce__(self):  # picklable (multiprocessing launchers) despite the custom signature
        return type(self), (self.path, self.module_type, self.way_out)


_version = [0]


def registry_version() -> tuple[int, int, int]:
    """Changes whenever a rule is registered or the table is edited (cached captures then rebuild)."""
    return _version[0], id(_RULES), len(_RULES)


def register_rule(module_type: type[nn.Module], rule: Rule) -> None:
    """Use ``rule`` for every module whose type is exactly ``module_type``.

    Example — a custom activation is two derivatives::

        hesscale.register_rule(MyAct, ElementwiseRule(lambda m, x, y: dσ(x), lambda m, x, y: d2σ(x)))
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be a hesscale.rules.Rule, got {type(rule).__name__}")
    _RULES[module_type] = rule
    _version[0] += 1


def supported_types() -> list[str]:
    return sorted(t.__name__ for t in _RULES)


def rule_for(module: nn.Module, path: str) -> Rule:
    """The rule of ``module`` (found at ``path``), or an error naming the supported types."""
    rule = _RULES.get(type(module))
    if rule is None:
        raise UnsupportedModuleError(path, type(module))
    return rule

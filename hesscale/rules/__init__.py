"""Per-module HesScale rules (pure math) and the registry mapping module types to them."""
from .base import Rule, Streams
from .elementwise import ElementwiseRule
from .registry import UnsupportedModuleError, register_rule, rule_for, supported_types

__all__ = ["Rule", "Streams", "ElementwiseRule", "UnsupportedModuleError", "register_rule", "rule_for", "supported_types"]

"""The policy: list files, their activation windows, and the compiled matcher."""

from .builder import LoadOptions
from .loader import load_policy
from .model import EMPTY_POLICY, Action, BlockList, ClientGroups, Policy, RuleSet

__all__ = [
    "EMPTY_POLICY",
    "Action",
    "BlockList",
    "ClientGroups",
    "LoadOptions",
    "Policy",
    "RuleSet",
    "load_policy",
]

"""The policy: list files, their activation windows, and the compiled matcher."""

from .loader import load_policy
from .model import EMPTY_POLICY, Action, BlockList, Policy, Rule
from .timewindow import NEVER, Window

__all__ = [
    "EMPTY_POLICY",
    "NEVER",
    "Action",
    "BlockList",
    "Policy",
    "Rule",
    "Window",
    "load_policy",
]

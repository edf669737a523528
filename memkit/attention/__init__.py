"""Exact attention over a segment's own keys plus any number of memory contexts."""

from memkit.attention.attend import attend
from memkit.attention.backends import Backend, attention_backend, available_backends, get_backend, register_backend
from memkit.attention.reference import attend_partial, merge_partials

__all__ = [
    "attend",
    "attend_partial",
    "merge_partials",
    "Backend",
    "available_backends",
    "attention_backend",
    "get_backend",
    "register_backend",
]

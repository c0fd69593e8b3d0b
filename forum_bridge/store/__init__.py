"""SQL state: models, the database wrapper and the transactional operations the service needs.

The names below are imported on first use: ``forum-bridge status`` reads through
:mod:`forum_bridge.store.status_query` alone and must not pay for importing SQLAlchemy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forum_bridge.store.database import Database
    from forum_bridge.store.operations import Registration

__all__ = ["Database", "Registration"]

_LAZY = {"Database": "forum_bridge.store.database", "Registration": "forum_bridge.store.operations"}


def __getattr__(name: str) -> Any:
    """``Database`` and ``Registration``, imported when first asked for."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

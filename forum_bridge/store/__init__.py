"""SQL state: models, the database wrapper and the transactional operations the service needs."""

from forum_bridge.store.database import Database
from forum_bridge.store.operations import Registration

__all__ = ["Database", "Registration"]

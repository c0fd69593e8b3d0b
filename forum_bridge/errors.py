"""The one exception tree of forum_bridge.

Third-party errors (SQLAlchemy, sockets, TOML parsing) are mapped onto these classes at the edge
where they happen, with ``raise ... from exc``, so callers only ever catch ``ForumBridgeError``.
"""

from __future__ import annotations


class ForumBridgeError(Exception):
    """Base class of every error forum_bridge raises on purpose."""


class ConfigError(ForumBridgeError):
    """The configuration file or an override is missing, malformed or out of range."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"configuration key {key}: {problem}" if key else problem)


class StoreError(ForumBridgeError):
    """The database could not be read or written."""


class SchemaError(StoreError):
    """The database schema is missing or older than this version expects."""


class NotFoundError(StoreError):
    """A subscriber, profile or other named record does not exist."""


class AlreadyExistsError(StoreError):
    """A record with that name exists already."""


class DecisionAbandoned(ForumBridgeError):
    """A call decision was rolled back because its caller had already answered without it."""


class InvalidInputError(ForumBridgeError):
    """An argument (log-on, number, CSV row, ...) is not acceptable."""


class PbxError(ForumBridgeError):
    """Talking to the PBX failed."""


class PbxConnectionError(PbxError):
    """The PBX cannot be reached or went away."""


class PbxAuthError(PbxError):
    """The PBX refused our credentials (AMI secret or ESL password)."""


class ProtocolError(PbxError):
    """A frame from the PBX or a hook client did not follow the protocol."""

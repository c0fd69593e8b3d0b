"""Allow ``python -m forum_bridge`` as a synonym of the ``forum-bridge`` command."""

from forum_bridge.cli import entry

entry()

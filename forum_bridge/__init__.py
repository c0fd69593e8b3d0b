"""forum_bridge: the Forum 523/524 floating SIP licence model for Asterisk and FreeSWITCH.

The package is layered: ``core`` holds the pure rules, ``store`` the SQL state, ``service`` applies
decisions, and ``adapters`` speak to each PBX. ``cli`` and ``web`` read through the service.
"""

__version__ = "0.1.0"

"""The Asterisk adapter: AMI events and enforcement, the FastAGI dialplan hook, the dialplan snippet.

The log-on of a phone is its PJSIP endpoint name, which must equal the endpoint's auth user name.
"""

from forum_bridge.adapters.asterisk.dialplan import render_dialplan

__all__ = ["render_dialplan"]

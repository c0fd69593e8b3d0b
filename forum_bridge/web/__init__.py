"""The status page, ``/status.json``, ``/metrics`` and the licence reset, served over HTTP.

:func:`forum_bridge.web.app.make_app` builds the WSGI application; :func:`forum_bridge.web.server.start_web`
serves it from a daemon thread.
"""

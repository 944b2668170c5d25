"""The operators' web console, served by the admin listener under ``/console``.

One HTML page and its shipped assets (``static/``: no CDN, no framework, works offline),
rendered in the browser from the admin API's JSON. :mod:`.sessions` holds the login
sessions, their CSRF tokens and the bound on login attempts; :mod:`.routes` the routes and
the security headers. The server (service/http.py) asks the session table whether a request
carries a valid session; see docs/console.md.
"""

from .routes import Console
from .sessions import LoginGuard, Session, SessionTable

__all__ = ["Console", "LoginGuard", "Session", "SessionTable"]

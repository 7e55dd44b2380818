"""``dcapd.wsgi:application`` for gunicorn, uwsgi or mod_wsgi.

Settings come from the environment (and the ini file named by ``DCAPD_CONFIG``, and Intel's
config/default.json named by ``DCAPD_INTEL_CONFIG``). TLS, if any, is the embedding server's
job.

The application is built when this module is imported, on purpose: WSGI servers import it
once per worker process, after forking, and every worker must open its own cache connection
and start its own refresh schedule (the lock in the cache lets one refresh run at a time).
A configuration error therefore stops the worker at start, not on its first request.
"""

import os

from .app import app_for
from .config import load_config
from .gate import BodyGate, BodyGateMiddleware
from .intelconfig import read_intel_config
from .logs import configure_from
from .schedule import scheduler_for
from .services import build_services

# DCAPD_INTEL_CONFIG names an Intel PCCS config/default.json, below the ini and environment.
_intel_config = os.environ.get("DCAPD_INTEL_CONFIG")
_config = load_config(base=read_intel_config(_intel_config)[0] if _intel_config else None)
configure_from(_config)
services = build_services(_config)
# The body rules of the TLS front (by route and token, decided from the head), as WSGI
# middleware: the embedding server has read the body by then, but the app never sees it.
application = BodyGateMiddleware(app_for(services), BodyGate(_config))
scheduler = scheduler_for(services)
scheduler.start()

"""``dcapd.wsgi:application`` for gunicorn, uwsgi or mod_wsgi.

Settings come from the environment (and the ini file named by ``DCAPD_CONFIG``, and Intel's
config/default.json named by ``DCAPD_INTEL_CONFIG``). TLS, if any, is the embedding server's
job.
"""

import os

from .app import create_app
from .config import load_config
from .intelconfig import read_intel_config
from .logs import configure_from
from .schedule import scheduler_for

# DCAPD_INTEL_CONFIG names an Intel PCCS config/default.json, below the ini and environment.
_intel_config = os.environ.get("DCAPD_INTEL_CONFIG")
_config = load_config(base=read_intel_config(_intel_config)[0] if _intel_config else None)
configure_from(_config)
application = create_app(_config)
# Every worker runs the schedule; the lock in the cache lets one refresh at a time.
scheduler = scheduler_for(application.services)
scheduler.start()

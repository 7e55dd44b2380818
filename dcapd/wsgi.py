"""``dcapd.wsgi:application`` for gunicorn, uwsgi or mod_wsgi.

Settings come from the environment (and the ini file named by ``DCAPD_CONFIG``). TLS, if any,
is the embedding server's job.
"""

from .app import create_app
from .cli import configure_logging
from .config import load_config
from .schedule import scheduler_for

_config = load_config()
configure_logging(_config.verbose)
application = create_app(_config)
# Every worker runs the schedule; the lock in the cache lets one refresh at a time.
scheduler = scheduler_for(application.services)
scheduler.start()

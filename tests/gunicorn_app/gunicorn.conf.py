# The whole integration: one line.
from mppool.gunicorn import child_exit, on_exit, on_starting, post_fork  # noqa: F401

workers = 4
worker_class = "sync"
timeout = 30
graceful_timeout = 5
loglevel = "info"

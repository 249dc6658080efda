# The whole integration: one line (the same hooks as for sync workers).
from mppool.gunicorn import on_exit, on_starting, post_fork  # noqa: F401

workers = 4
worker_class = "uvicorn_worker.UvicornWorker"
timeout = 30
graceful_timeout = 5
loglevel = "info"

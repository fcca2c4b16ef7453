"""A test handler that logs, counts its own metric and tries to leak secrets.

Payload keys (all optional):
  log_lines   log this many lines through ctx.log, each padded to `log_bytes` characters
  plain_log   also log one line through a plain module logger (not ctx.log)
  leak        log and print the payload and the database password, return the `token` field
              in the result, and fail with a message and traceback that quote it
  password_file  log the content of this file (a database password)
  crash_on    attempts on which the worker SIGKILLs itself (after counting the call)
  wait_for    sleep until this path exists (the test lets the item end when it has looked)
  seconds     sleep this long first
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

from bulkjob import Permanent

log = logging.getLogger("obs_handler")

# Defined at import time, in the worker, after the metrics directory is set: a handler's own
# metrics are aggregated across workers like the job's.
try:
    from prometheus_client import Counter

    CALLS = Counter("obs_handler_calls", "Attempts that reached the test handler.")
except ImportError:  # pragma: no cover
    CALLS = None


def handle(item, ctx):
    p = item.payload
    if CALLS is not None:
        CALLS.inc()
    if ctx.attempt in p.get("crash_on", ()):
        os.kill(os.getpid(), signal.SIGKILL)
    if p.get("seconds"):
        time.sleep(p["seconds"])
    if p.get("wait_for"):
        while not os.path.exists(p["wait_for"]):
            time.sleep(0.05)
    size = int(p.get("log_bytes", 0))
    for n in range(int(p.get("log_lines", 0))):
        head = f"line {item.id}/{n} "
        ctx.log.info("%s%s|", head, "x" * max(0, size - len(head) - 1))
    if p.get("password_file"):
        with open(p["password_file"]) as f:
            ctx.log.info("the file holds %s", f.read().strip())
    if p.get("plain_log"):
        log.info("plain logger line for %s", item.id)
    if p.get("leak"):
        ctx.log.info("payload is %s; password is %s", p, os.environ.get("BULKJOB_DB_PASSWORD"))
        log.warning("s3 key is %s", os.environ.get("AWS_SECRET_ACCESS_KEY"))
        print(f"printed token {p['token']}")
        print(f"printed password {os.environ.get('BULKJOB_DB_PASSWORD')}", file=sys.stderr)
        if p.get("fail"):
            try:
                raise ValueError(f"token {p['token']} refused")
            except ValueError:
                log.exception("while using token %s", p["token"])
                raise Permanent(f"cannot use token {p['token']}", code="T-LEAK") from None
        return {"token": p["token"], "nested": [{"again": f"Bearer {p['token']}"}]}
    return {"ok": True}

"""A test handler that writes to stdout every way it can, and fails with a message of several
lines; its module prints at import too (in the parent, which imports it first, and in workers).

Payload keys (all optional): token (a secret, with --redact token), fail (raise a multi-line
error after writing).
"""

from __future__ import annotations

import ctypes
import os
import sys

print("printed at import")


def handle(item, ctx):
    token = item.payload.get("token", "")
    print(f"print() of {item.id} {token}")
    sys.stdout.buffer.write(f"stdout.buffer of {item.id} {token}\n".encode())
    sys.stdout.buffer.flush()
    os.write(1, f"os.write(1) of {item.id}\n".encode())
    line = f"libc write(1) of {item.id}\n".encode()
    ctypes.CDLL(None).write(1, line, len(line))
    if item.payload.get("fail"):
        raise ValueError(f"first line of {item.id}\nsecond line\nthird line with {token}")
    return {"ok": True}

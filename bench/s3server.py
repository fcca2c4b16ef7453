"""The S3 test server of the benchmarks: moto's server on loopback, counting every request.

Requests are counted at the server, in a WSGI layer around moto's own application, so a count
is what reached S3 (client retries included), whatever the client does. The layer answers two
paths of its own, never passed to moto: `GET /_bench/requests` (the requests since the last
reset: time, method, kind of object, bytes received and sent, status) and `POST /_bench/reset`.

    python -m bench.s3server PORT
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time

#: What a request touched, from its key: the manifest's parts, the lease, or anything else.
_KINDS = (("seg", re.compile(r"/seg-[^/]*\.jsonl(\.gz)?$")), ("snap", re.compile(r"/snap-[^/]*\.jsonl\.gz$")),
          ("meta", re.compile(r"/meta\.json$")), ("lease", re.compile(r"/lease\.json$")))


def kind_of(method: str, path: str, query: str) -> str:
    for kind, pattern in _KINDS:
        if pattern.search(path):
            return kind
    _bucket, _, key = path.lstrip("/").partition("/")
    if not key:
        if "delete" in query:
            return "delete-batch"
        return "list" if method == "GET" else "bucket"
    return "other"


class Counting:
    """WSGI middleware: logs every request it forwards to `app`."""

    def __init__(self, app) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.log: list[dict] = []

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "")
        if path.startswith("/_bench/"):
            return self._control(method, path, start_response)
        return self._forward(environ, start_response, method, path)

    def _forward(self, environ, start_response, method, path):
        received = int(environ.get("HTTP_X_AMZ_DECODED_CONTENT_LENGTH")
                       or environ.get("CONTENT_LENGTH") or 0)
        entry = {"t": time.time(), "method": method,
                 "kind": kind_of(method, path, environ.get("QUERY_STRING", "")),
                 "received": received, "sent": 0, "status": 0}
        status_box = []

        def recording_start(status, headers, exc_info=None):
            status_box.append(int(status.split()[0]))
            return start_response(status, headers, exc_info)

        body = self.app(environ, recording_start)
        try:
            for chunk in body:
                entry["sent"] += len(chunk)
                yield chunk
        finally:
            if hasattr(body, "close"):
                body.close()
            entry["status"] = status_box[0] if status_box else 0
            with self.lock:
                self.log.append(entry)

    def _control(self, method, path, start_response):
        with self.lock:
            if path == "/_bench/reset" and method == "POST":
                self.log = []
                data = b"{}"
            else:
                data = json.dumps(self.log).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]


def main() -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    port = int(sys.argv[1])
    app = Counting(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

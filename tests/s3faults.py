"""An HTTP proxy in front of the S3 test server that answers some writes with errors.

It speaks HTTP on both sides (keep-alive included), so boto3 sees real 503 SlowDown and 500
InternalError responses, as S3 sends them under load.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ERRORS = {
    503: b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
         b"<Message>Please reduce your request rate.</Message></Error>",
    500: b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
         b"<Message>We encountered an internal error. Please try again.</Message></Error>",
}


class FaultyS3:
    """Forwards to `target_port`; a PUT is answered 503 with probability `slowdown`, else 500
    with probability `internal_error`."""

    def __init__(self, target_port: int, *, slowdown: float = 0.0, internal_error: float = 0.0,
                 seed: int = 7) -> None:
        self.target_port = target_port
        self.slowdown = slowdown
        self.internal_error = internal_error
        self.rand = random.Random(seed)
        self.injected = {503: 0, 500: 0}
        self.forwarded_puts = 0
        #: The next this many PUTs are forwarded, but their answers dropped (the connection is
        #: closed): a write that landed while its client saw an error.
        self.unheard_puts = 0
        self.landed_unheard = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if self.command == "PUT":
                    status = proxy._roll()
                    if status:
                        data = ERRORS[status]
                        self.send_response(status)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data)
                        return
                    proxy.forwarded_puts += 1
                conn = http.client.HTTPConnection("127.0.0.1", proxy.target_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                if self.command == "PUT" and proxy.unheard_puts > 0:
                    # The write landed; its answer is lost on the way back.
                    proxy.unheard_puts -= 1
                    proxy.landed_unheard += 1
                    conn.close()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _roll(self) -> int | None:
        roll = self.rand.random()
        if roll < self.slowdown:
            self.injected[503] += 1
            return 503
        if roll < self.slowdown + self.internal_error:
            self.injected[500] += 1
            return 500
        return None

    def stop(self) -> None:
        self.server.shutdown()

"""TCP proxies on loopback: one that a test can cut (connections refused), make hang, and
restore, to take S3 (or a database) away from a running job without restarting the server,
which would lose moto's in-memory data; and one that cuts a PostgreSQL session right after a
given answer.
"""

from __future__ import annotations

import socket
import threading


class TcpProxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.target_port = target_port
        probe = socket.socket()
        probe.bind((host, 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.url = f"http://{host}:{self.port}"
        self.mode = "pass"  # pass | hang | deaf
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        """Listen again and forward new connections."""
        self.mode = "pass"
        if self._listener is None:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.port))
            listener.listen(128)
            self._listener = listener
            threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Stop listening and reset every open connection: clients get 'connection refused'."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would leave the
            # port bound until it returned.
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def hang(self) -> None:
        """Accept connections but forward nothing: clients wait until their own timeouts."""
        self.cut()
        self.restore()
        self.mode = "hang"

    def deaf(self) -> None:
        """Forward requests but drop every answer: a write lands while its client times out
        (an ambiguous write)."""
        self.cut()
        self.restore()
        self.mode = "deaf"

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(client)
            if self.mode == "hang":
                continue
            try:
                upstream = socket.create_connection((self.host, self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.append(upstream)
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            back = self._drain if self.mode == "deaf" else self._pipe
            threading.Thread(target=back, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _drain(src: socket.socket, _dst: socket.socket) -> None:
        try:
            while src.recv(65536):
                pass
        except OSError:
            pass

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class CutAfterAnswer:
    """A TCP proxy on loopback that speaks just enough of PostgreSQL's protocol to cut the
    connection at the worst moment for a client: once armed, right after the server's answer to
    a command whose tag starts with `tag` has passed (CommandComplete "COMMIT") and before the
    ReadyForQuery that follows it, as a server that stops between those two messages does."""

    def __init__(self, port: int, tag: bytes = b"COMMIT") -> None:
        self.upstream = port
        self.tag = tag
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = threading.Event()
        self.cut = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(("127.0.0.1", self.upstream))
        threading.Thread(target=TcpProxy._pipe, args=(client, server), daemon=True).start()
        self._answers(server, client)

    def _answers(self, server: socket.socket, client: socket.socket) -> None:
        buffer = b""
        try:
            while data := server.recv(65536):
                buffer += data
                while len(buffer) >= 5:  # whole messages only: a type byte, then a length
                    size = 1 + int.from_bytes(buffer[1:5], "big")
                    if len(buffer) < size:
                        break
                    message, buffer = buffer[:size], buffer[size:]
                    client.sendall(message)
                    if self.armed.is_set() and message[:1] == b"C" and message[5:].startswith(self.tag):
                        self.cut.set()
                        for sock in (client, server):
                            sock.shutdown(socket.SHUT_RDWR)
                            sock.close()
                        return
        except OSError:
            pass

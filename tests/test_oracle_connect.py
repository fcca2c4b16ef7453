"""What reaches python-oracledb's thin-mode connect, seen on the wire, and how its failures are
classified: real connects to sockets on loopback that this test controls (a closed port, one
that reads the connect packet and closes, one that never answers, TLS servers with certificates
made here). No Oracle server, no mock of the driver.

The first packet a thin-mode client sends carries its connect descriptor in clear text (inside
TLS for tcps): `(DESCRIPTION=(EXPIRE_TIME=1)...(ADDRESS=(PROTOCOL=tcp)(HOST=...)(PORT=...))
(CONNECT_DATA=(SERVICE_NAME=...)...))`, which is what the listener here records.
"""

from __future__ import annotations

import datetime
import importlib
import signal
import socket
import ssl
import threading
import time

import pytest

from job.db import ConnectTimeout, DbSettings, parse_db_url, preflight, preflight_failure
from job.errors import UsageError
from job.outcome import CONFIG, DATABASE, OUTAGE, PERMANENT, RETRYABLE

oracledb = pytest.importorskip("oracledb")
from job.db import oracle  # noqa: E402  (needs oracledb)

#: The python-oracledb major version whose private error constructor these tests use.
ORACLEDB_MAJOR = "26"
private_api = pytest.mark.skipif(not oracledb.__version__.startswith(ORACLEDB_MAJOR + "."),
                                 reason=f"built with oracledb {ORACLEDB_MAJOR}.x's private _Error")
WALLET_SECRET = "wallet-secret-4f2a"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Listener:
    """A TCP socket on loopback. `record`: read what the client sends first (after a TLS
    handshake with `tls`), keep it in `received`, close. `silent`: accept and never answer."""

    def __init__(self, *, mode: str = "record", tls: ssl.SSLContext | None = None) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.mode = mode
        self.tls = tls
        self.held: list[socket.socket] = []
        self.received: list[bytes] = []
        self.tls_errors: list[BaseException] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.mode == "silent":
                self.held.append(conn)
                continue
            threading.Thread(target=self._record, args=(conn,), daemon=True).start()

    def _record(self, conn: socket.socket) -> None:
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            conn.settimeout(2)
            data = b""
            while b")))" not in data and len(data) < 8192:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            self.received.append(data)
        except (OSError, ssl.SSLError) as e:
            self.tls_errors.append(e)
        finally:
            conn.close()

    def descriptor(self) -> str:
        """The connect descriptor of the first connect packet received."""
        assert self.received, f"nothing received; TLS errors: {self.tls_errors}"
        text = self.received[0].decode("latin-1")
        return text[text.index("(DESCRIPTION="):]

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def listener(request):
    made: list[Listener] = []

    def make(**kwargs) -> Listener:
        made.append(Listener(**kwargs))
        return made[-1]

    yield make
    for each in made:
        each.close()


def oracle_at(port: int, host: str = "127.0.0.1", timeout: float = 3.0, *, scheme: str = "oracle",
              query: str = "") -> DbSettings:
    return parse_db_url(f"{scheme}://scott@{host}:{port}/FREEPDB1{query}", connect_timeout=timeout)


# -- plain TCP -----------------------------------------------------------------------------------

def test_real_connect_to_closed_port_is_an_outage():
    with pytest.raises(oracledb.OperationalError) as e:
        oracle.connect(oracle_at(closed_port()), "tiger")
    failure = oracle.classify(e.value)
    assert (failure.code, failure.kind, failure.reconnect, failure.system) == ("DPY-6005", OUTAGE, True, DATABASE)


@pytest.mark.parametrize("query, expire", [("", "(EXPIRE_TIME=1)"), ("?expire_time=7", "(EXPIRE_TIME=7)"),
                                           ("?expire_time=0", None)])
def test_connect_descriptor_on_the_wire(listener, query, expire):
    server = listener()
    with pytest.raises(oracledb.OperationalError) as e:
        oracle.connect(oracle_at(server.port, query=query), "tiger")
    descriptor = server.descriptor()
    for part in (f"(ADDRESS=(PROTOCOL=tcp)(HOST=127.0.0.1)(PORT={server.port}))", "(SERVICE_NAME=FREEPDB1)",
                 "(TRANSPORT_CONNECT_TIMEOUT=3)"):
        assert part in descriptor
    if expire is None:
        assert "EXPIRE_TIME" not in descriptor
    else:
        assert expire in descriptor
    assert "tiger" not in descriptor  # the password travels only after the handshake, encrypted
    # The listener closed the connection after reading: DPY-6005 caused by DPY-4011, an outage.
    assert e.value.args[0].full_code == "DPY-6005" and e.value.__cause__.args[0].full_code == "DPY-4011"
    assert oracle.classify(e.value).kind == OUTAGE


@pytest.mark.parametrize("in_thread", [False, True], ids=["main-thread", "other-thread"])
def test_connect_to_silent_listener_times_out(listener, in_thread):
    server = listener(mode="silent")
    box = {}
    alarm_before = signal.getitimer(signal.ITIMER_REAL)[0]

    def attempt():
        started = time.monotonic()
        try:
            oracle.connect(oracle_at(server.port, timeout=1.0), "tiger")
        except BaseException as e:
            box["error"] = e
        box["seconds"] = time.monotonic() - started

    if in_thread:
        thread = threading.Thread(target=attempt)
        thread.start()
        thread.join(30)
    else:
        attempt()
    assert isinstance(box.get("error"), ConnectTimeout), box
    assert box["seconds"] < 5
    failure = preflight_failure(oracle_at(server.port), box["error"])
    assert (failure.kind, failure.code, failure.reconnect, failure.connecting) == (OUTAGE, "CONNECT-TIMEOUT", True,
                                                                                   True)
    # An alarm set before (pytest-timeout's) is put back, not lost.
    alarm_after = signal.getitimer(signal.ITIMER_REAL)[0]
    assert (alarm_after > 0) == (alarm_before > 0) and alarm_after <= alarm_before


def test_preflight_without_a_password_is_a_configuration_error(monkeypatch):
    monkeypatch.delenv("BULKJOB_DB_PASSWORD", raising=False)
    settings = oracle_at(closed_port())
    with pytest.raises(oracledb.DatabaseError) as e:
        preflight(settings)
    assert preflight_failure(settings, e.value).kind == CONFIG and e.value.args[0].full_code == "DPY-4001"


def test_unresolvable_host_is_an_outage():
    with pytest.raises(socket.gaierror) as e:
        oracle.connect(oracle_at(1521, host="db.nonexistent.invalid"), "tiger")
    failure = oracle.classify(e.value)
    assert failure.kind == OUTAGE and failure.reconnect and failure.code.startswith("EAI_")


def test_preflight_of_an_unreachable_database_is_an_outage_while_connecting(monkeypatch):
    monkeypatch.setenv("BULKJOB_DB_PASSWORD", "tiger")
    settings = oracle_at(closed_port())
    with pytest.raises(oracledb.OperationalError) as e:
        preflight(settings)
    failure = preflight_failure(settings, e.value)
    assert (failure.kind, failure.system, failure.connecting, failure.code) == (OUTAGE, DATABASE, True, "DPY-6005")


# -- TLS -----------------------------------------------------------------------------------------

def certificates(tmp_path, *, host: str = "localhost", client: bool = False):
    """A CA, a server certificate for `host` signed by it (server.pem), and a wallet directory
    holding the CA (wallet/ewallet.pem), or with `client` a client key, encrypted with
    WALLET_SECRET, and its certificate too (for mutual TLS)."""
    crypto = pytest.importorskip("cryptography")
    del crypto
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def issue(name, signer=None, issuer=None, *, ca=False, dns=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if dns:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
        return key, builder.sign(signer or key, hashes.SHA256())

    def pem(cert):
        return cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(key, password=None):
        encryption = (serialization.BestAvailableEncryption(password.encode()) if password
                      else serialization.NoEncryption())
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)

    ca_key, ca = issue("bulkjob test CA", ca=True)
    server_key, server = issue(host, ca_key, ca.subject, dns=host)
    (tmp_path / "server.pem").write_bytes(pem(server) + key_pem(server_key))
    (tmp_path / "ca.pem").write_bytes(pem(ca))
    wallet = tmp_path / "wallet"
    wallet.mkdir()
    content = pem(ca)
    if client:
        client_key, client_cert = issue("bulkjob client", ca_key, ca.subject)
        content = key_pem(client_key, WALLET_SECRET) + pem(client_cert) + pem(ca)
    (wallet / "ewallet.pem").write_bytes(content)
    return wallet


def tls_server(tmp_path, *, client_certificate: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "server.pem")
    if client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(tmp_path / "ca.pem")
    return context


def test_tcps_with_a_wallet_ca_speaks_tls(tmp_path, listener):
    wallet = certificates(tmp_path)
    server = listener(tls=tls_server(tmp_path))
    settings = oracle_at(server.port, host="localhost", scheme="oracle+tcps", query=f"?wallet_location={wallet}")
    oracle.check_settings(settings, environ={})
    with pytest.raises(oracledb.OperationalError) as e:
        oracle.connect(settings, "tiger")
    # The handshake succeeded (the CA came from the wallet), then the connect packet came over TLS.
    descriptor = server.descriptor()
    assert f"(ADDRESS=(PROTOCOL=tcps)(HOST=localhost)(PORT={server.port}))" in descriptor
    assert "(EXPIRE_TIME=1)" in descriptor and not server.tls_errors
    assert oracle.classify(e.value).kind == OUTAGE  # the server closed after reading


@pytest.mark.parametrize("host, wallet, cause", [
    ("localhost", False, "SSLCertVerificationError"),  # the system's CAs do not know ours
    ("localhost.localdomain", True, "DPY-6006"),  # the driver's own check of the server's name
], ids=["unknown-ca", "other-host-name"])
def test_tls_certificate_that_does_not_verify_is_a_configuration_error(tmp_path, listener, monkeypatch, host,
                                                                       wallet, cause):
    monkeypatch.setenv("BULKJOB_DB_PASSWORD", "tiger")
    wallet_dir = certificates(tmp_path, host=host)
    server = listener(tls=tls_server(tmp_path))
    query = f"?wallet_location={wallet_dir}" if wallet else ""
    settings = oracle_at(server.port, host="localhost", scheme="oracle+tcps", query=query)
    with pytest.raises(oracledb.OperationalError) as e:
        preflight(settings)
    assert cause in (type(e.value.__cause__).__name__, str(e.value.__cause__).split(":")[0])
    failure = preflight_failure(settings, e.value)
    assert (failure.kind, failure.code, failure.connecting) == (CONFIG, "DPY-6005", True)
    assert not any(server.received)  # no connect packet went to a server that did not verify


def test_mutual_tls_with_the_wallet_password_from_the_environment(tmp_path, listener):
    wallet = certificates(tmp_path, client=True)
    server = listener(tls=tls_server(tmp_path, client_certificate=True))
    settings = oracle_at(server.port, host="localhost", scheme="oracle+tcps", query=f"?wallet_location={wallet}")
    environ = {"BULKJOB_DB_WALLET_PASSWORD": WALLET_SECRET}
    oracle.check_settings(settings, environ=environ)
    with pytest.raises(oracledb.OperationalError):
        oracle.connect(settings, "tiger", environ=environ)
    # The server required and verified the client's certificate: the key was decrypted.
    assert "(PROTOCOL=tcps)" in server.descriptor() and not server.tls_errors


@pytest.mark.parametrize("environ, given", [({}, "not set"), ({"BULKJOB_DB_WALLET_PASSWORD": "wrong-secret"}, "set")])
def test_wallet_key_that_cannot_be_opened_is_refused_at_load(tmp_path, environ, given):
    wallet = certificates(tmp_path, client=True)
    settings = oracle_at(2484, host="localhost", scheme="oracle+tcps", query=f"?wallet_location={wallet}")
    with pytest.raises(UsageError) as e:
        oracle.check_settings(settings, environ=environ)
    assert f"BULKJOB_DB_WALLET_PASSWORD ({given})" in str(e.value) and "wrong-secret" not in str(e.value)


# -- batch errors ----------------------------------------------------------------------------------

def batch_error(number: int, text: str, offset: int):
    """A batch error as cursor.getbatcherrors() returns it (python-oracledb's private _Error)."""
    return oracledb._Error(f"ORA-{number:05d}: {text}", code=number, offset=offset)


@private_api
def test_batch_errors_that_are_the_rows_data_are_returned():
    errors = [batch_error(1, "unique constraint (APP.PK) violated", 2),
              batch_error(1400, 'cannot insert NULL into ("APP"."T"."V")', 5),
              batch_error(2290, "check constraint (APP.CK) violated", 7),
              batch_error(12899, 'value too large for column "APP"."T"."S" (actual: 30, maximum: 20)', 9)]
    rows, other = oracle.split_batch_errors(errors, start=100)
    assert other is None
    assert [(r.offset, r.code) for r in rows] == [(102, "ORA-00001"), (105, "ORA-01400"), (107, "ORA-02290"),
                                                  (109, "ORA-12899")]


@private_api
@pytest.mark.parametrize("number, text, kind", [
    (60, "deadlock detected while waiting for resource", RETRYABLE),
    (54, "resource busy and acquire with NOWAIT specified", RETRYABLE),
    (1031, "insufficient privileges", PERMANENT),
])
def test_a_batch_error_that_is_not_the_rows_data_is_raised(number, text, kind):
    rows, other = oracle.split_batch_errors([batch_error(1, "unique constraint violated", 0),
                                             batch_error(number, text, 3)], start=0)
    assert [r.offset for r in rows] == [0]
    assert isinstance(other, oracledb.DatabaseError)
    failure = oracle.classify(other)
    assert (failure.kind, failure.code) == (kind, f"ORA-{number:05d}")


@pytest.mark.parametrize("sql, dml", [
    ("INSERT INTO t VALUES (:1, :2)", True), ("  update t set v = :1", True), ("DELETE t WHERE k = :1", True),
    ("MERGE INTO t USING dual ON (1 = 1) WHEN MATCHED THEN UPDATE SET v = :1", True),
    ("/* hint */ -- x\n INSERT INTO t VALUES (:1)", True), ("(INSERT INTO t VALUES (:1))", True),
    ("BEGIN app.load(:1, :2); END;", False), ("DECLARE n NUMBER; BEGIN NULL; END;", False),
    ("CALL app.load(:1)", False), ("SELECT :1 FROM dual", False),
])
def test_batch_errors_only_for_dml(sql, dml):
    # DPY-2040 refuses batcherrors=True for anything but INSERT, UPDATE, DELETE and MERGE.
    assert oracle.is_dml(sql) is dml


@private_api
def test_driver_error_constructor_is_the_drivers():
    # The pinned private API these tests rely on builds what the driver raises.
    errors = importlib.import_module("oracledb.errors")
    exc = errors._create_exception(errors.ERR_CONNECTION_CLOSED)
    assert isinstance(exc, oracledb.DatabaseError) and exc.args[0].full_code == "DPY-4011"

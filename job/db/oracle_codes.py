"""Oracle's error codes, and what each means: the item's fault, a passing conflict, an outage, a refusal, a row's data.

job.db.oracle reads the codes out of python-oracledb's exceptions; what they come to is decided
here. Pure: no driver, no database.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..outcome import CONFIG, OUTAGE, PERMANENT, RETRYABLE

#: The database cannot be reached or ended the session: an outage, not the item's fault.
#: Reconnect, then run the item again without spending an attempt. Thin mode raises most of
#: these as DPY codes; the ORA numbers are what a server (or thick mode) sends as they are.
UNREACHABLE = frozenset({
    "DPY-4011",  # the database or network closed the connection (ORA-03113, 03135, 00028 ...)
    "DPY-4033",  # the database closed the connection: idle time exceeded
    "DPY-6000",  # the listener refused the connection
    "DPY-6001",  # the service is not registered with the listener (yet: startup, failover)
    "DPY-6003",  # the SID is not registered with the listener
    "DPY-6005",  # cannot connect (no listener, reset, timeout ...), unless REFUSED says why
    "ORA-00018", "ORA-00020",  # maximum sessions / processes exceeded: wait for others to leave
    "ORA-00028", "ORA-01012", "ORA-01033", "ORA-01034", "ORA-01089", "ORA-01090", "ORA-01092",
    "ORA-02396", "ORA-03113", "ORA-03114", "ORA-03135", "ORA-12170", "ORA-12514", "ORA-12516",
    "ORA-12518", "ORA-12519", "ORA-12520", "ORA-12521", "ORA-12526", "ORA-12527", "ORA-12528",
    "ORA-12537", "ORA-12541", "ORA-12543", "ORA-12547", "ORA-12570", "ORA-12571", "ORA-25408",
})
#: The database refuses our settings: trying again cannot help until the configuration is
#: fixed, and every failed login counts towards locking the account (the DEFAULT profile locks
#: it after 10, for a day, for every user of that account).
REFUSED = frozenset({
    "ORA-01017",  # invalid username/password; logon denied
    "ORA-28000",  # the account is locked
    "ORA-28001",  # the password has expired
    "ORA-01045",  # the user lacks CREATE SESSION privilege
    "ORA-01005",  # null password given
    "ORA-28040",  # no matching authentication protocol
    "ORA-12660",  # encryption or crypto-checksumming parameters incompatible
    "ORA-28547",  # connection to server failed, probable Oracle Net admin error
    "DPY-2018",   # the wallet file (ewallet.pem) was not found
    "DPY-3001",   # a feature thin mode lacks, such as native network encryption (under DPY-6005)
    "DPY-3010",   # a database version thin mode does not support
    "DPY-3015",   # a password verifier type thin mode does not support (10G)
    "DPY-4001",   # no credentials
    "DPY-4017", "DPY-4018", "DPY-4021",  # a connect string the driver cannot use
    "DPY-4032",   # an invalid TLS version
    "DPY-6002", "DPY-6006", "DPY-6008", "DPY-6009",  # the server's certificate or name does not match
})
#: The session is unusable, the database is not in question: reconnect, then retry (an attempt).
NEW_SESSION = frozenset({
    "DPY-1001",  # not connected (the connection was closed)
    "DPY-4005",  # timed out waiting for a pooled connection
    "DPY-4024",  # call timeout (--statement-timeout) exceeded: thin mode drops the session
})
#: Worth another attempt after the transaction is rolled back (always all of it: on Oracle a
#: rollback to a savepoint does not release a deadlock's waiter).
PASSING = frozenset({
    "ORA-00051",  # timeout waiting for a resource
    "ORA-00054",  # resource busy and acquire with NOWAIT specified or timeout expired
    "ORA-00060",  # deadlock detected
    "ORA-01555",  # snapshot too old
    "ORA-02049",  # timeout: distributed transaction waiting for lock
    "ORA-04020",  # deadlock detected while trying to lock object
    "ORA-04021",  # timeout waiting to lock an object
    "ORA-04061",  # existing state of a package has been invalidated (recompiled)
    "ORA-04065",  # not executed, a package was altered or dropped
    "ORA-04068",  # existing state of packages has been discarded
    "ORA-08177",  # can't serialize access for this transaction
    "ORA-30006",  # resource busy; acquire with WAIT timeout expired
    "ORA-63302",  # transaction must roll back: a priority transaction took its lock (23ai)
})
#: Row errors of a batch that are the row's data, returned as RowError; any other row error
#: (a lock, a deadlock, a missing privilege) is raised.
DATA_ERRORS = frozenset({
    1,      # unique constraint violated
    1400,   # cannot insert NULL
    1407,   # cannot update to NULL
    1401, 12899,  # value too large for column
    1438,   # value larger than specified precision
    1426,   # numeric overflow
    1722,   # invalid number
    1858,   # a non-numeric character was found where a numeric was expected
    1830, 1839, 1840, 1841, 1843, 1847, 1850, 1851, 1852, 1861,  # date conversions
    1461,   # can bind a LONG value only for insert into a LONG column
    2290,   # check constraint violated
    2291,   # parent key not found
    2292,   # child record found
    6502,   # PL/SQL numeric or value error (in a trigger)
    40441, 40479,  # JSON syntax error, JSON serializer error
})


def ora_code(number: int) -> str | None:
    """`ORA-nnnnn` for an error number (python-oracledb's `.code`), None for 0."""
    return f"ORA-{number:05d}" if number else None


def shown_code(full_code: str, ora: str | None) -> str | None:
    """The code a failure shows: `DPY-4011/ORA-03113` when thin mode rewrote a server's error,
    else the one code there is."""
    return f"{full_code}/{ora}" if full_code.startswith("DPY-") and ora else (full_code or ora)


def judge(full_code: str, ora: str | None, within: Iterable[str], *, tls_refused: bool) -> tuple[str, bool]:
    """(kind, reconnect) for an error whose own codes are `full_code` (`DPY-4011`,
    `ORA-00060`) and `ora` (the ORA number thin mode kept), `within` the codes of the errors
    it carries (its causes', and those in its message), `tls_refused` whether a TLS handshake
    failed for a reason of configuration. A refusal anywhere in the chain wins: a DPY-6005
    caused by DPY-3001 is a configuration to fix, not an outage to wait out."""
    own = {full_code, ora}
    if (own | set(within)) & REFUSED or tls_refused:
        return CONFIG, True
    if own & UNREACHABLE:
        return OUTAGE, True
    if full_code in NEW_SESSION:
        return RETRYABLE, True
    if own & PASSING:
        return RETRYABLE, False
    return PERMANENT, False

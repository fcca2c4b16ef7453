"""A damaged manifest: refused with exit 2 and nothing changed; --manifest-repair recovers."""

import pytest
from conftest import run_bulkjob, status_of, summary_of, write_items
from ledger import applied

pytestmark = pytest.mark.faults


@pytest.mark.parametrize("victim, damage", [
    ("seg", lambda data: data[: len(data) // 2]),
    ("seg", lambda data: b"\x00\xff garbage"),
    ("meta", lambda data: data[:10]),
])
def test_damaged_manifest_is_refused_then_repaired(tmp_path, victim, damage):
    env = {"LEDGER_DB": str(tmp_path / "ledger.db")}
    items = write_items(tmp_path / "items.jsonl", [{"id": i} for i in range(40)])
    argv = ("run", "--items", str(items), "--handler", "ledger:handle", "--manifest", str(tmp_path / "st"),
            "--run-id", "r1", "--metrics-port", "0", "--checkpoint-interval", "0.05")
    assert run_bulkjob(*argv, env=env).returncode == 0
    shard = tmp_path / "st" / "r1" / "shard-00000-of-00001"
    # The first segment that holds a done record: damaging it loses what it recorded.
    segments = [p for p in sorted(shard.glob("seg-*")) if b'"state":"done"' in p.read_bytes()]
    target = segments[0] if victim == "seg" else shard / "meta.json"
    target.write_bytes(damage(target.read_bytes()))
    before = {p.name: p.read_bytes() for p in shard.iterdir()}
    refused = run_bulkjob(*argv, env=env)
    assert refused.returncode == 2
    assert target.name in refused.stderr and "--manifest-repair" in refused.stderr
    assert {p.name: p.read_bytes() for p in shard.iterdir()} == before  # nothing was changed
    repaired = run_bulkjob(*argv, "--manifest-repair", env=env)
    assert repaired.returncode == 0, repaired.stderr
    assert "manifest repaired" in repaired.stderr
    assert status_of(str(tmp_path / "st"), "r1")["done"] == 40
    # Only the records that were lost ran again.
    lost = summary_of(repaired)["attempts"]
    assert sum(applied(tmp_path / "ledger.db").values()) == 40 + lost
    assert (lost == 0) == (victim == "meta")
    assert run_bulkjob(*argv, env=env).returncode == 0  # clean from now on

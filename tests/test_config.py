"""Worker-count defaults from the cgroup CPU quota, not the host's CPU count."""

import pytest

from job.config import cgroup_cpu_limit, default_workers


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "200000 100000\n"}, 2.0),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cgroup_cpu_limit(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == expected


@pytest.mark.parametrize("limit, cpus, expected", [
    (2.0, 64, 2),
    (1.5, 64, 2),
    (0.5, 64, 1),
    (None, 8, 8),
    (None, 0, 1),
])
def test_default_workers(limit, cpus, expected):
    assert default_workers(limit, cpus) == expected


@pytest.mark.parametrize("text, expected", [
    ("1048576", 1048576), ("512M", 512 * 1024**2), ("2Gi", 2 * 1024**3), ("64k", 65536), ("1GB", 1024**3),
])
def test_parse_size(text, expected):
    from job.config import parse_size

    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "1.5G", "12X", "-1"])
def test_parse_size_refuses_nonsense(text):
    from job.config import parse_size

    with pytest.raises(ValueError):
        parse_size(text)

"""The committed Python code of the admin API is what scripts/gen_protos.py generates from protos/ now."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_not_stale(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    sys.path.insert(0, str(ROOT / "scripts"))
    from gen_protos import generated_files

    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "feddem").rglob("*") if p.is_file()}
    committed = {p.relative_to(ROOT / "protos"): p.read_bytes() for p in generated_files(ROOT / "protos")}
    assert fresh, "the generator wrote nothing"
    assert sorted(map(str, fresh)) == sorted(map(str, committed)), "files differ: run scripts/gen_protos.py"
    stale = [str(p) for p in fresh if fresh[p] != committed[p]]
    assert not stale, f"stale generated code {stale}: run `.venv/bin/python scripts/gen_protos.py` and commit"


def test_every_service_method_is_served():
    """The server's handlers come from the proto's descriptor: each method has an implementation."""
    from feddem.admin.v1 import admin_pb2
    from feddem.server.admin import service

    for name, impl in (("AdminService", service.AdminService), ("RecorderService", service.RecorderService)):
        methods = [m.name for m in admin_pb2.DESCRIPTOR.services_by_name[name].methods]
        assert methods and all(callable(getattr(impl, m, None)) for m in methods), name

"""bench/gpu_check.sh --dry-run: the GPU readiness check's every part on CPU (tiny shapes, Triton interpreter).

It exercises the mechanics (the parts import what they measure, write their tables, and a correctness
failure or an exception in a part makes the script exit 1); the figures of a dry run mean nothing.
A part that spends its time budget on a loaded machine counts as run ("timeout"), not as failed.
"""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CLARA_ATTENTION", "TRITON_INTERPRET")}
    env.update(OUT=str(tmp_path / "out"), BUDGET="400", TRITON_CACHE_DIR=str(tmp_path / "triton"))
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    res = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert res["meta"]["dry_run"] is True and res["meta"]["failed_parts"] == []
    parts = res["parts"]
    assert set(parts) == {"env", "cold", "p", "a", "b", "c", "d", "e"}
    assert all(p["status"] in ("ok", "timeout") for p in parts.values()), {k: p["status"] for k, p in parts.items()}
    if parts["a"]["status"] == "ok":
        assert parts["a"]["dispatcher"]["as_documented"] and parts["a"]["all_ok"]
    assert (tmp_path / "out" / "gpu_check.md").read_text().startswith("# clara GPU check (DRY RUN on CPU)")

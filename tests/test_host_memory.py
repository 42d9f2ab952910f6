"""Freed host memory is kept for reuse: a forecast step does not page-fault its tensors in
afresh (glibc's ``mmap`` of blocks over 128 KiB, unmapped when freed)."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]

_CHILD = """
import json, resource, torch
from weathermodel.host_memory import keep_freed_memory
from weathermodel.models.io import load_model

torch.set_num_threads(1)
network = load_model(sys.argv[1]).network.eval()
inputs = network.grid_embed[0].in_features - network.grid_node_features.shape[1]
x = torch.randn(4, inputs, network.n_latitude, network.n_longitude)

def faults_per_forward():
    with torch.no_grad():
        network(x)  # warm: constants, first allocations
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            network(x)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5

plain = faults_per_forward()
applied = keep_freed_memory()
print(json.dumps({"plain": plain, "applied": applied, "kept": faults_per_forward(),
                  "again": keep_freed_memory()}))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the mallopt settings exist on Linux with glibc only")
def test_forward_pass_stops_page_faulting_once_freed_memory_is_kept(tmp_path: Path) -> None:
    """The demo network's forward pass (batch 4) page-faults thousands of 4 KiB pages per
    call with glibc's defaults, and almost none once :func:`keep_freed_memory` is applied."""
    result = subprocess.run(
        [sys.executable, "-c", "import sys\n" + _CHILD,
         str(PROJECT / "checkpoints" / "ncep_graph_2013")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1", "WEATHERMODEL_CACHE": str(tmp_path / "cache"),
             "PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT)})
    assert result.returncode == 0, result.stderr[-2000:]
    faults = json.loads(result.stdout.strip().splitlines()[-1])
    assert faults["applied"] and faults["again"]
    assert faults["plain"] > 1000, faults  # measured about 4,500
    assert faults["kept"] < faults["plain"] / 20, faults  # measured under 60

"""Peak memory of `weathermodel prepare` for a record N and 4N time steps long.

Each prepare runs in its own process (its peak RSS read from /proc/self/status VmHWM), on synthetic 1.5-degree,
70-channel sources. Memory must not grow with the length of the record: prints
`RATIO prepare_peak_rss_4x_vs_1x <x>` (goal: close to 1, well under the 4x growth of the data).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _synthetic import synthetic_source

# VmHWM, not getrusage: ru_maxrss survives fork+exec on Linux and would report the parent's
# peak (the parent has just generated the source).
_CHILD = """
import sys
from weathermodel.configuration import from_dict
from weathermodel.data.config import PrepareConfig
from weathermodel.data.prepare import prepare
prepare(from_dict(PrepareConfig, {"sources": [{"path": sys.argv[1]}], "output": sys.argv[2],
                                  "time_block": 8}), progress=False)
with open("/proc/self/status") as status:
    print(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
"""


def peak_rss_mib(source: Path, output: Path) -> tuple[float, float]:
    begin = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _CHILD, str(source), str(output)],
                            capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1]) / 1024, time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--times", type=int, default=24)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results = {}
        for factor in (1, 4):
            source = root / f"source{factor}.zarr"
            synthetic_source(args.times * factor, source)
            results[factor] = peak_rss_mib(source, root / f"store{factor}.zarr")
            data_mib = args.times * factor * 70 * 121 * 240 * 4 / 2**20
            print(f"{args.times * factor:4d} times ({data_mib:6.0f} MiB of data): peak RSS "
                  f"{results[factor][0]:7.0f} MiB, {results[factor][1]:5.1f} s")
        print(f"RATIO prepare_peak_rss_4x_vs_1x {results[4][0] / results[1][0]:.2f} "
              "(data grew 4.00x; goal ~1)")


if __name__ == "__main__":
    main()

"""`make bench`: run every benchmark in this folder and print a summary of their ratios."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# benchmarks whose full size takes long (the year of 1-degree forecasts: ~10 min, 15 GiB for
# WB2) run in their quick form here; run them by hand for the full numbers
ARGUMENTS = {"bench_evaluate_vs_wb2.py": ["--quick"]}


def main() -> int:
    summary, failed = [], []
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"== {script.name}", flush=True)
        result = subprocess.run([sys.executable, str(script), *ARGUMENTS.get(script.name, [])],
                                capture_output=True, text=True, cwd=HERE)
        print(result.stdout, end="")
        if result.returncode != 0:
            failed.append(script.name)
            print(result.stderr[-2000:], file=sys.stderr)
        summary += [f"{script.name:28s} {line[len('RATIO '):]}"
                    for line in result.stdout.splitlines() if line.startswith("RATIO ")]
    print("\n== summary of ratios (same-run references)")
    print("\n".join(summary) if summary else "(none)")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

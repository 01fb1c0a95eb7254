"""Run the README's quick-start command exactly and record what it measured (benchmarks/results/demo.json).

The README's demo figures (perplexity, wall time, phases, peak memory) are rendered from this record by
``benchmarks/tables.py``, never typed. Run it on an idle machine: the wall time is the point.

    python benchmarks/demo.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmprune.report import git_commit, machine, write_json_atomic  # noqa: E402

# The README's quick-start flags (after the installs); --save/--report go to a temp dir.
DEMO = ["--pattern", "2:4", "--method", "admm", "--nsamples", "16", "--seqlen", "512", "--eval", "wikitext2",
        "--eval-windows", "8"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "llmprune", *DEMO, "--data-dir", args.data_dir, "--save", f"{tmp}/smollm2-2of4",
               "--report", f"{tmp}/run.json"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        run = json.loads(Path(f"{tmp}/run.json").read_text())
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    record = {"benchmark": "benchmarks/demo.py", "command": ["python", "-m", "llmprune", *DEMO, "--data-dir", "…",
                                                              "--save", "…", "--report", "…"],
              "commit": git_commit(), "machine": machine(), "wall_seconds": round(wall, 1),
              "peak_rss_gb": round(peak / 1e9, 2), "ppl": run["ppl"]["pruned"], "seconds": run["seconds"],
              "sparsity": run["prune"]["sparsity"]}
    write_json_atomic(args.out, record)
    print(json.dumps({k: v for k, v in record.items() if k != "command"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

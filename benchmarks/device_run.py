"""Every GPU measurement llmprune needs, in one process, in priority order, within a time budget.

GPU minutes are scarce (issue #12): one call of the device tool should run this and nothing else.

    python3 benchmarks/device_run.py --out "$OUT"                      # on the GPU machine (540 s budget)
    python3 benchmarks/device_run.py --out "$OUT" --gguf .gl/smollm2.gguf --data-dir .gl/data   # + quality rows
    python benchmarks/device_run.py --dry-run --out /tmp/dr            # the same stages on CPU at tiny shapes

Stages, most valuable first: (a) ``pytest -m gpu`` (correctness before any timing), (b) the kernel grid
on the Llama-2-7B shapes and one 70B shape, M in {1, 4, 16, 64, 2048, 8192}, fp16 + bf16, with the
copy bandwidth of the same run (-> ``kernels.json``, and the measured ``dispatch.json``), (c) end-to-end
greedy decode of a random Llama-2-7B built on the device, dense vs 2:4 vs 4x4:8, (d) the opt-in
cuSPARSELt path (its tests, then its timings only if they pass), in processes of their own and after
everything else that uses the GPU context, since its last failure poisoned the context, (e) the 7B
and then the 13B streamed prune (``scale.json``), (f) quality rows on SmolLM2 when ``--gguf`` is given.

Each stage is a subprocess with what is left of the budget as its timeout, and each benchmark writes its
rows atomically as it goes, so a stage cut off keeps what it measured. ``device_run.json`` (rewritten
after every stage) records each stage's command, exit code, seconds and output tail. The result files
start as copies of ``benchmarks/results/*`` so the benchmarks merge into them; copy them back after the
call. At most 8 files are written to ``--out`` (the device tool returns no more).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmprune.report import git_commit, machine, write_json_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RESERVE_S = 10  # kept back for writing the record after the last stage


@dataclass
class Stage:
    name: str
    cmd: list[str]
    cap_s: float  # the most this stage may take of the budget
    min_s: float = 20.0  # not started with less than this left
    env: dict[str, str] = field(default_factory=dict)
    needs: str | None = None  # a stage that must have passed first


def stages(args: argparse.Namespace) -> list[Stage]:
    py, out, dry = sys.executable, Path(args.out), args.dry_run
    bench = str(ROOT / "benchmarks")
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(ROOT / "tests")]
    kern = [py, f"{bench}/kernels.py", "--out", str(out / "kernels.json")] + ["--dry-run"] * dry
    interp = {"TRITON_INTERPRET": "1"} if dry else {}
    if dry:
        scale = [py, f"{bench}/scale.py", "--shape", "tiny", "--nsamples", "4", "--seqlen", "32", "--device", "cpu",
                 "--runs", "admm@2:4", "--quiet", "--out", str(out / "scale.json")]
        scale_runs = [("scale_tiny", scale)]
    else:
        scale_runs = [(f"scale_{s}", [py, f"{bench}/scale.py", "--shape", s, "--runs", "admm@2:4", "--quiet",
                                      "--out", str(out / "scale.json")]) for s in ("7b", "13b")]
    grid = ["--shapes", "7b,70b-mlp", "--reps", "30"]
    out_stages = [
        Stage("gpu_tests", [*pytest, "-m", "gpu and not cusparselt"], cap_s=150, env=interp),
        Stage("kernels", [*kern, *([] if dry else grid), "--deadline", str(150 if not dry else 60),
                          "--dispatch-out", str(out / "dispatch.json")], cap_s=200, env=interp),
        Stage("e2e_decode", [*kern, "--e2e"], cap_s=120, env=interp),
        Stage("cusparselt_tests", [*pytest, "-m", "cusparselt"], cap_s=40, min_s=15),
        Stage("cusparselt_kernels", [*kern, "--cusparselt", *([] if dry else ["--shapes", "7b", "--m", "2048,8192"])],
              cap_s=60, needs="cusparselt_tests", env=interp),
        *[Stage(name, cmd, cap_s=300, min_s=60 if not dry else 5) for name, cmd in scale_runs],
    ]
    if args.gguf:
        out_stages.append(Stage("quality", [py, f"{bench}/quality.py", "--model", args.gguf, "--data-dir", args.data_dir,
                                            "--methods", args.quality_methods, "--patterns", args.quality_patterns,
                                            "--out", str(out / "quality.json")], cap_s=600, min_s=60))
    return out_stages


def run_stage(stage: Stage, timeout: float, env: dict[str, str], log: Path) -> dict:
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n=== {stage.name}: {' '.join(stage.cmd)} (timeout {timeout:.0f} s)\n")
        f.flush()
        try:
            done = subprocess.run(stage.cmd, env={**env, **stage.env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=timeout, cwd=ROOT)
            output, rc = done.stdout, done.returncode
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired as e:
            output = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            rc, status = None, "timeout"
        f.write(output)
    return {"status": status, "rc": rc, "seconds": round(time.perf_counter() - t0, 1), "cmd": stage.cmd,
            "tail": output[-2000:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the results (on the device machine: $OUT)")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for all stages together")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: proves every stage without a GPU")
    p.add_argument("--only", default=None, help="comma list of stage names to run (default: all)")
    p.add_argument("--gguf", default=None, help="SmolLM2 GGUF for the quality stage (skipped without it)")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--quality-methods", default="admm")
    p.add_argument("--quality-patterns", default="50%,2:4")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("kernels.json", "scale.json", "quality.json"):  # the benchmarks merge into these copies
        if (RESULTS / name).is_file() and not (out / name).exists() and not args.dry_run:
            shutil.copy(RESULTS / name, out / name)
    commit = git_commit()
    # the device's copy of .git may be stale: every row is stamped with the commit of the tree that was sent
    env = {**os.environ, "LLMPRUNE_COMMIT": commit, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    record = {"benchmark": "benchmarks/device_run.py", "command": ["python", *sys.argv], "commit": commit,
              "machine": machine(), "budget_s": args.budget, "dry_run": args.dry_run, "stages": {}}
    log = out / "device_run.log"
    wanted = set(args.only.split(",")) if args.only else None
    for stage in stages(args):
        left = args.budget - (time.perf_counter() - t0) - RESERVE_S
        if wanted is not None and stage.name not in wanted:
            continue
        if stage.needs and record["stages"].get(stage.needs, {}).get("status") != "ok":
            result = {"status": "skipped", "why": f"{stage.needs} did not pass"}
        elif left < stage.min_s:
            result = {"status": "skipped", "why": f"{left:.0f} s left of the budget"}
        else:
            result = run_stage(stage, min(stage.cap_s, left), env, log)
        record["stages"][stage.name] = result
        print(f"{stage.name:20s} {result['status']:8s} {result.get('seconds', 0):7.1f} s", flush=True)
        record["seconds"] = round(time.perf_counter() - t0, 1)
        write_json_atomic(out / "device_run.json", record)
    bad = [n for n, r in record["stages"].items() if r["status"] in ("failed", "timeout")]
    print(json.dumps({"commit": commit, "machine": record["machine"], "seconds": record.get("seconds"),
                      "failed": bad}, default=str))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

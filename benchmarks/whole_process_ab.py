"""Whole-process ``tem-ij predict`` of two source trees on the same model and image, alternated.

For a before/after figure from one run on a shared, noisy machine: each round runs the ``before``
tree, then the ``after`` tree (this checkout), each as its own process (``python -m tem_ij_plugin``
with that tree first on ``PYTHONPATH``), and reports medians of wall time and the largest peak RSS.

    git worktree add /tmp/before <commit>
    python benchmarks/whole_process_ab.py /tmp/before MODEL IMAGE [--rounds 5] [--after-args "--precision int8"]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run_once(tree: Path, model: Path, image: Path, out: Path, extra: list) -> tuple:
    """Wall seconds and peak RSS (MB) of one ``tem-ij predict`` from ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "tem_ij_plugin", "-q", "predict", str(model), str(image),
           "-o", str(out), "--overwrite", *extra]  # fmt: skip
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    rss = next((int(line.split()[-1]) / 1024 for line in res.stderr.splitlines() if "Maximum resident" in line), None)
    return wall, rss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path, help="the source tree to compare with (a git worktree)")
    ap.add_argument("model", type=Path)
    ap.add_argument("image", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--after-args", default="", help="extra tem-ij predict options for this checkout only")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="tem-ij-ab-"))
    trees = {"before": (args.before.resolve(), []), "after": (ROOT, shlex.split(args.after_args))}
    runs: dict = {k: [] for k in trees}
    for _ in range(args.rounds):
        for name, (tree, extra) in trees.items():
            runs[name].append(run_once(tree, args.model, args.image, out / f"{name}.tif", extra))
    res = {
        name: {"wall_s": round(float(np.median([w for w, _ in r])), 2), "max_rss_mb": round(max(m or 0 for _, m in r))}
        for name, r in runs.items()
    }
    res["after_args"] = args.after_args
    res["speedup"] = round(res["before"]["wall_s"] / res["after"]["wall_s"], 3)
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Threads and tile batch of ``tem-ij predict``, as a whole process, on this machine's cores.

Runs ``tem-ij predict MODEL IMAGE`` under ``/usr/bin/time -v`` for every combination of intra-op
threads (``OMP_NUM_THREADS``, which torch and so the onnxruntime session take as their thread count)
and ``--batch-size``, alternating the combinations round by round so that a shared machine's noise
falls on all of them alike. Reports median wall time, megapixels per second and peak resident memory,
with the core count and CPU model (the answer differs between machines).

    python benchmarks/predict_speed.py --keep /tmp/speed      # a trained model and the 3840x2920 image
    python benchmarks/predict_threads.py /tmp/speed/default.model /tmp/speed/big.tif --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from predict_speed import cpu_name, whole_process  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("image", type=Path)
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma-separated thread counts")
    ap.add_argument("--batch", default="1,2", help="comma-separated tile batch sizes")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import tifffile

    with tifffile.TiffFile(args.image) as tif:
        megapixels = float(np.prod(tif.series[0].shape)) / 1e6  # planes x rows x columns
    combos = [(int(t), int(b)) for t in args.threads.split(",") for b in args.batch.split(",")]
    walls = {c: [] for c in combos}
    rss = {c: 0.0 for c in combos}
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for threads, batch in combos:
                os.environ["OMP_NUM_THREADS"] = str(threads)
                res = whole_process(
                    args.model, args.image, Path(tmp) / "probs.tif", "auto", 1, ["--batch-size", str(batch)]
                )
                walls[threads, batch].append(res["wall_s"])
                rss[threads, batch] = max(rss[threads, batch], res["max_rss_mb"] or 0.0)
    os.environ.clear()
    os.environ.update(env)
    rows = []
    for threads, batch in combos:
        wall = float(np.median(walls[threads, batch]))
        row = {"threads": threads, "batch": batch, "wall_s": round(wall, 2), "all_s": walls[threads, batch],
               "megapixels_per_s": round(megapixels / wall, 2), "max_rss_mb": rss[threads, batch]}  # fmt: skip
        rows.append(row)
        print(row, flush=True)
    if args.json:
        about = {"cpu": cpu_name(), "cores": os.cpu_count(), "image": str(args.image), "megapixels": megapixels}
        args.json.write_text(json.dumps({**about, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of ``tem-ij predict`` on uint8 stacks of 2048x2048 sections: flat in the number of planes.

Writes a synthetic Z stack (the same 2048x2048 section, shifted per plane) as an ImageJ TIFF and runs
``tem-ij predict`` on it as a child process, reporting wall time and its maximum resident set size.
By default nothing is trained: a default-architecture model with random weights. Its tiles are not a
trained model's: the overlap follows the model's effective receptive field, which is small for random
weights (512-pixel tiles with 32 px overlap here, against 960 px and 240 px for a trained depth-5
model), and its near-uniform outputs pass the bf16 accuracy check where a trained model may fall back
to fp32. ``--model`` runs a trained model instead (``predict_speed.py --keep DIR`` keeps one), which is
what the memory and throughput of a user's run are.
Float32 probabilities of 400 such planes (13 GB) exceed the ImageJ TIFF limit, so the default runs
write BigTIFF (``.btf``) for every size.

Separate runs of the same command differ in their peak by a few hundred MB (glibc's heap lands in a
different layout each time; README, *The 400-plane stack*), which says nothing about growth with the
stack. So each run also records its own peak so far (``VmHWM``) at every progress line of
``tem-ij predict`` (one every 10 s): ``peak_by_plane``, and ``max_rss_mb_first_40`` (the peak at the
last line reporting plane 40 or less) against the run's final ``max_rss_mb`` compares 40 planes with
400 in one process.

Usage::

    python benchmarks/predict_memory.py                    # 40 and 400 planes (400 takes ~15 min)
    python benchmarks/predict_memory.py --planes 40 --out /tmp/tem-ij-mem
    python benchmarks/predict_memory.py --model /tmp/speed/default.model   # a trained model's tiles
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_stack(path: Path, planes: int, size: int = 2048) -> None:
    """A uint8 ImageJ stack written plane by plane (never held in memory whole)."""
    import tifffile

    from tem_ij_plugin.synthetic import make_tem_image

    section, _ = make_tem_image(size, size, seed=7)
    with tifffile.TiffWriter(path, imagej=True) as tif:
        tif.write(
            (np.roll(section, 16 * z, axis=1) for z in range(planes)),
            shape=(planes, size, size),
            dtype=np.uint8,
            metadata={"axes": "ZYX"},
        )


def _peak_so_far_kb(pid: int) -> int | None:
    """The process's peak resident memory so far (``VmHWM``, kB), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), None)
    except OSError:
        return None


def time_and_peak_memory(argv: list) -> tuple[float, int, list]:
    """Run ``tem-ij ARGV``: (wall seconds, peak resident kB, [(plane, peak kB so far)] per progress line)."""
    cmd = [shutil.which("tem-ij"), *argv]  # not -q: its progress lines (stderr) say which plane it is on
    t = time.perf_counter()
    timeline, lines = [], []
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        for line in proc.stderr:
            lines.append(line)
            found = re.search(r"plane (\d+)/\d+", line)
            peak = _peak_so_far_kb(proc.pid) if found else None
            if peak is not None:
                timeline.append((int(found.group(1)), peak))
        _, status, usage = os.wait4(proc.pid, 0)  # reaps it, with its resource usage
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError("".join(lines[-20:]))
    return wall, usage.ru_maxrss, timeline  # ru_maxrss: kB on Linux


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--planes", default="40,400", help="comma-separated stack depths")
    ap.add_argument("--suffix", default=".btf", help="output type: .btf, .tif or .zarr")
    ap.add_argument("--extra", default="", help="more tem-ij predict options, e.g. '--dtype uint8'")
    ap.add_argument("--model", type=Path, help="a trained model file (default: random weights, see above)")
    ap.add_argument("--out", type=Path, help="work folder (default: a temporary one, removed afterwards)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "predict_memory.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tem_ij_plugin.modelio import TrainedModel, build_network, save_model
    from tem_ij_plugin.normalization import DEFAULT_NORMALIZATION

    work = args.out or Path(tempfile.mkdtemp(prefix="tem-ij-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    from tem_ij_plugin.config import Settings

    model = args.model
    if model is None:
        arch = {"name": "RecurrentUNet", "in_channels": 1, "n_classes": 2, **Settings().model.model_dump()}
        meta = {"classes": ["background", "cell"], "architecture": arch, "normalization": dict(DEFAULT_NORMALIZATION)}
        model = work / "default.model"
        save_model(model, TrainedModel(build_network(arch).eval(), meta))
    rows = []
    try:
        for n in [int(p) for p in args.planes.split(",")]:
            stack = work / f"stack{n}.tif"
            write_stack(stack, n)
            out = work / f"probs{n}{args.suffix}"
            argv = ["predict", str(model), str(stack), "-o", str(out), *args.extra.split()]
            wall, rss, timeline = time_and_peak_memory(argv)
            first_40 = [kb for plane, kb in timeline if plane <= 40]
            row = {
                "planes": n,
                "input_mb": round(stack.stat().st_size / 2**20),
                "output": out.name,
                "output_mb": round(sum(f.stat().st_size for f in [out] if f.is_file()) / 2**20),
                "wall_s": round(wall, 1),
                "megapixels_per_s": round(n * 2048 * 2048 / 1e6 / wall, 2),
                "max_rss_mb": round(rss / 1024),
                "max_rss_mb_first_40": round(first_40[-1] / 1024) if first_40 else None,
                "peak_by_plane": [[plane, round(kb / 1024)] for plane, kb in timeline],
            }
            rows.append(row)
            print({k: v for k, v in row.items() if k != "peak_by_plane"}, flush=True)
            stack.unlink()
            if out.is_dir():
                shutil.rmtree(out)
            else:
                out.unlink()
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    about = {"suffix": args.suffix, "extra": args.extra, "model": str(args.model or "random weights")}
    args.json.write_text(json.dumps({**about, "runs": rows}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

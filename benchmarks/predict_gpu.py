"""Prediction and training on a CUDA GPU: the 3840x2920 image end to end and a 100-plane 4096² stack.

Two steps, so that the GPU's time is spent on the GPU:

``prepare DIR`` (on any machine, CPU): trains the default model on a synthetic partially annotated
1024x1024 image for ``--minutes`` (as ``predict_speed.py`` does) and writes to DIR the model, the
unseen synthetic 3840x2920 test image (``big.tif``), its truth and the training data.

``run DIR`` (on the GPU machine) measures, each section guarded so that one failure keeps the rest
(``--json`` is rewritten after every section):

* ``inprocess``: the 3840x2920 image, normalised, through :meth:`Predictor.plane` (host to device,
  tiles, blending, device to host) per backend, precision and tiling: median seconds, MP/s, peak GPU
  memory, mIoU against the truth and the acceptance test against fp32 over the whole image;
* ``uint8_to_probabilities``: the uint8 image in memory to probabilities, normalised on the CPU
  first or on the GPU (``Predictor.plane(raw, normalization=...)``);
* ``profile``: torch.profiler's busiest GPU operations on that image, cuDNN's autotuning on and off,
  and each stage of a 4096² plane alone (read, normalise, predict, to uint8, checksum);
* ``files``: :func:`~tem_ij_plugin.workflows.predict_files` on copies of ``big.tif`` (read, predict,
  write a float32 TIFF), in a process whose CUDA is already up: the first file (model loaded, precision
  checked) and the median of the others;
* ``whole_process``: ``python -m tem_ij_plugin predict --device cuda`` as its own process, and the
  start-up alone (``import torch`` and CUDA's initialisation);
* ``stack``: ``--planes`` planes of ``--side``² (the test image mirrored to size and shifted per plane)
  written as a TIFF, then through :func:`~tem_ij_plugin.predict.predict_planes` (read-ahead and
  hand-off threads, uint8 output not written), MP/s; then through ``tem-ij predict --dtype uint8`` as
  a whole process;
* ``seams``: the default tiling against one tile on a 2048x2048 crop, fp32 on the GPU;
* ``training``: ``--train-iterations`` iterations of the default settings on the GPU in fp32 and in
  ``auto`` (bf16 autocast): iterations/s and the test image's mIoU.

Usage::

    python benchmarks/predict_gpu.py prepare /tmp/gpu --minutes 3      # here, ~4 minutes on 2 cores
    python benchmarks/predict_gpu.py run /tmp/gpu --json gpu.json      # on the GPU, ~4 minutes
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))


def prepare(folder: Path, minutes: float, seed: int) -> None:
    """Train the default model on the CPU and write it with the test and training data to ``folder``."""
    from predict_speed import make_data

    from tem_ij_plugin.config import Settings
    from tem_ij_plugin.io import write_hyperstack
    from tem_ij_plugin.modelio import save_model
    from tem_ij_plugin.train import train

    folder.mkdir(parents=True, exist_ok=True)
    train_img, labels, big, big_truth = make_data(seed)
    s = Settings()
    s.train.max_minutes, s.train.seed = minutes, seed
    save_model(folder / "default.model", train(train_img[None], labels, s, device="cpu").model)
    write_hyperstack(folder / "big.tif", big[None])
    np.savez_compressed(folder / "data.npz", truth=big_truth, train=train_img, labels=labels.labels)
    (folder / "classes.json").write_text(json.dumps(labels.classes))


def timed(fn, repeats: int, warmup: int = 1) -> tuple:
    """(median seconds, last result) of ``repeats`` calls after ``warmup`` untimed ones."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def miou(pred: np.ndarray, truth: np.ndarray) -> float:
    from isbi_partial import miou as _miou

    return round(_miou(pred.astype(np.int64), truth.astype(np.int64)), 4)


def environment() -> dict:
    import torch

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "bf16": torch.cuda.is_bf16_supported(),
        "cpu_threads": torch.get_num_threads(),
    }


IN_PROCESS = [  # (backend, precision, tile, batch); None = the default for a GPU
    ("auto", "auto", None, None),
    ("torch", "fp32", None, None),
    ("torch", "bf16", None, None),
    ("torch", "fp16", None, None),
    ("torch", "bf16", 2048, 2),
    ("torch", "bf16", 4096, 1),
    ("torch", "fp32", 4096, 1),
]


def in_process(model, dev, x: np.ndarray, truth: np.ndarray, repeats: int) -> dict:
    """The normalised image through :meth:`Predictor.plane` for each row of :data:`IN_PROCESS`."""
    import torch

    from tem_ij_plugin.backends import precision_report
    from tem_ij_plugin.predict import make_predictor, probe_crop
    from tem_ij_plugin.receptive import HALO_MASS

    erf = model.meta.get("effective_receptive_field") or {}
    halo = erf.get("radius") if erf.get("mass") == HALO_MASS else None
    probe = np.ascontiguousarray(probe_crop(x))
    rows, ref = {}, None
    for backend, precision, tile, batch in IN_PROCESS:
        t0 = time.perf_counter()
        pred = make_predictor(
            model.net, dev, backend, precision, tile, None, batch, probe=probe, halo=halo
        )  # fmt: skip
        build_s = time.perf_counter() - t0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds, probs = timed(lambda pred=pred: pred.plane(x), repeats)
        row = {
            "precision": pred.precision,
            "tile": pred.tile,
            "overlap": pred.overlap,
            "batch": pred.batch_size,
            "build_s": round(build_s, 3),
            "seconds": round(seconds, 4),
            "megapixels_per_s": round(x.size / 1e6 / seconds, 1),
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if dev.type == "cuda" else None,
            "miou": miou(probs.argmax(0), truth),
        }
        if precision == "fp32" and tile is None:
            ref = probs
        elif ref is not None:
            row["whole_image_vs_fp32"] = {k: round(float(v), 5) for k, v in precision_report(ref, probs).items()}
        rows[f"{backend}-{precision}-tile{tile or 'default'}-batch{batch or 'default'}"] = row
        print(f"  {backend} {precision} tile {pred.tile} batch {pred.batch_size}: {row}", flush=True)
    return rows


def uint8_to_probabilities(model, dev, big: np.ndarray, repeats: int) -> dict:
    """From the uint8 image in memory to probabilities on the host: normalised on the CPU first, and
    normalised where the tiles run (``Predictor.plane(raw, normalization=...)``), with the result read
    back through the page-locked buffer and without it."""
    from tem_ij_plugin.normalization import normalization_range, normalize
    from tem_ij_plugin.predict import make_predictor, probe_crop

    lo, hi = normalization_range(big)
    pred = make_predictor(model.net, dev, probe=normalize(probe_crop(big), lo, hi))
    cpu_s, before = timed(lambda: pred.plane(normalize(big, lo, hi)), repeats)
    dev_s, after = timed(lambda: pred.plane(big, normalization=(lo, hi)), repeats)
    pred.pinned_readback = False
    pageable_s, _ = timed(lambda: pred.plane(big, normalization=(lo, hi)), repeats)
    return {
        "precision": pred.precision,
        "normalised_on_cpu_s": round(cpu_s, 4),
        "normalised_on_device_s": round(dev_s, 4),
        "normalised_on_device_pageable_readback_s": round(pageable_s, 4),
        "max_abs_diff": float(np.abs(before - after).max()),
    }


def stage_times(model, dev, big: np.ndarray, work: Path, side: int, repeats: int) -> dict:
    """Each stage of ``tem-ij predict`` on one ``side``² plane, alone: where a plane's time goes."""
    import zlib

    from tem_ij_plugin.apply import to_output
    from tem_ij_plugin.io import PlaneReader, write_hyperstack
    from tem_ij_plugin.normalization import normalization_range, normalize
    from tem_ij_plugin.predict import make_predictor, probe_crop

    path = work / "plane.tif"
    write_hyperstack(path, stack_plane(big, side, 0)[None])
    with PlaneReader(path) as reader:
        read_s, raw = timed(lambda: reader.read(0), repeats)
    lo, hi = normalization_range(raw)
    pred = make_predictor(model.net, dev, probe=normalize(probe_crop(raw), lo, hi))
    norm_s, x = timed(lambda: normalize(raw, lo, hi), repeats)
    plane_s, probs = timed(lambda: pred.plane(x), repeats)
    raw_s, _ = timed(lambda: pred.plane(raw, normalization=(lo, hi)), repeats)
    pred.pinned_readback = False
    pageable_s, _ = timed(lambda: pred.plane(raw, normalization=(lo, hi)), repeats)
    out_s, out = timed(lambda: to_output(probs, "probabilities", np.uint8), repeats)
    crc_s, _ = timed(lambda: zlib.crc32(memoryview(np.ascontiguousarray(out)).cast("B")), repeats)
    stages = {"read": read_s, "normalize_cpu": norm_s, "plane_normalised": plane_s, "plane_raw": raw_s,
              "plane_raw_pageable_readback": pageable_s, "to_output_uint8": out_s, "crc32": crc_s}  # fmt: skip
    return {"side": side, "seconds": {k: round(v, 4) for k, v in stages.items()}}


def profile(model, dev, big: np.ndarray, work: Path, repeats: int, side: int) -> dict:
    """torch.profiler over the default path on the 3840x2920 image, and the stages of a ``side``² plane."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from tem_ij_plugin.normalization import normalization_range, normalize
    from tem_ij_plugin.predict import make_predictor, probe_crop

    lo, hi = normalization_range(big)
    pred = make_predictor(model.net, dev, probe=normalize(probe_crop(big), lo, hi))
    pred.plane(big, normalization=(lo, hi))
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            pred.plane(big, normalization=(lo, hi))
    rows = []
    for ev in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:15]:
        rows.append({"op": ev.key, "calls": ev.count, "self_device_ms": round(ev.self_device_time_total / 3e3, 2),
                     "self_cpu_ms": round(ev.self_cpu_time_total / 3e3, 2)})  # fmt: skip
    total_device = sum(ev.self_device_time_total for ev in prof.key_averages()) / 3e3
    res = {"per_call_device_ms": round(total_device, 1), "top_ops": rows}
    torch.backends.cudnn.benchmark = True  # cuDNN picks its convolution algorithms by timing them
    pred.plane(big, normalization=(lo, hi))
    res["cudnn_benchmark_s"] = round(timed(lambda: pred.plane(big, normalization=(lo, hi)), repeats)[0], 4)
    torch.backends.cudnn.benchmark = False
    res["cudnn_default_s"] = round(timed(lambda: pred.plane(big, normalization=(lo, hi)), repeats)[0], 4)
    res["stages"] = stage_times(model, dev, big, work, side, 5)
    print(f"  {res}", flush=True)
    return res


def files(model_path: Path, dev, image: Path, work: Path, n: int) -> dict:
    """``predict_files`` on ``n`` copies of ``image``: seconds per file, the first one apart."""
    from tem_ij_plugin.workflows import predict_files

    copies = []
    for i in range(n):
        copies.append(work / f"big_{i}.tif")
        shutil.copyfile(image, copies[-1])
    marks = []
    predict_files(
        model_path, copies, work / "out", device=str(dev), on_file=lambda *a: marks.append(time.perf_counter())
    )
    marks.append(time.perf_counter())
    per_file = np.diff(marks)
    return {
        "files": n,
        "first_s": round(float(per_file[0]), 3),
        "median_rest_s": round(float(np.median(per_file[1:])), 3),
    }


def child(cmd: list, timeout: float) -> dict:
    """Wall time of a child process; its peak RSS (children so far, as ``getrusage`` keeps it)."""
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} exited {res.returncode}: {res.stderr[-2000:]}")
    return {
        "wall_s": round(wall, 3),
        "max_rss_children_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
    }


def whole_process(model_path: Path, dev, image: Path, work: Path, repeats: int) -> dict:
    py = sys.executable
    warm_up = f"import torch; torch.zeros(1, device='{dev}')"  # CUDA's context is created here
    startup = [child([py, "-c", warm_up], 120)["wall_s"] for _ in range(repeats)]
    cmd = [py, "-m", "tem_ij_plugin", "-q", "predict", str(model_path), str(image), "-o", str(work / "wp.tif"),
           "--device", str(dev), "--overwrite"]  # fmt: skip
    walls = [child(cmd, 300)["wall_s"] for _ in range(repeats)]
    return {"predict_wall_s": walls, "median_s": float(np.median(walls)), "torch_cuda_startup_s": startup}


def stack_plane(big: np.ndarray, side: int, i: int) -> np.ndarray:
    """Plane ``i`` of the synthetic stack: the test image mirrored to ``side``², shifted by ``37 * i`` px."""
    ph, pw = max(0, side - big.shape[0]), max(0, side - big.shape[1])
    plane = np.pad(big, ((0, ph), (0, pw)), mode="reflect")[:side, :side]
    return np.roll(plane, 37 * i, axis=(0, 1))


def stack(model, model_path: Path, dev, big: np.ndarray, work: Path, planes: int, side: int) -> dict:
    """The stack through :func:`predict_planes` (read from the TIFF, uint8 output, not written), then
    through ``tem-ij predict --dtype uint8`` as a whole process."""
    from tem_ij_plugin.apply import to_output
    from tem_ij_plugin.io import PlaneReader, write_hyperstack
    from tem_ij_plugin.normalization import normalize, sampled_range
    from tem_ij_plugin.predict import make_predictor, predict_planes, probe_crop

    path = work / "stack.tif"
    write_hyperstack(path, np.stack([stack_plane(big, side, i) for i in range(planes)]))
    res = {"planes": planes, "side": side}
    with PlaneReader(path) as reader:
        lo, hi = sampled_range(reader.read, planes, model.normalization)
        first = reader.read(0)
        pred = make_predictor(model.net, dev, probe=normalize(probe_crop(first), lo, hi))
        pred.plane(first[:1024, :1024], normalization=(lo, hi))
        res.update(precision=pred.precision, tile=pred.tile, batch=pred.batch_size)
        sink = lambda i, p: to_output(p, "probabilities", np.uint8)  # noqa: E731
        for readback in ("pinned", "pageable"):
            pred.pinned_readback = readback == "pinned"
            t = time.perf_counter()
            predict_planes(pred, reader.read, planes, lo, hi, sink)
            wall = time.perf_counter() - t
            mps = round(planes * side * side / 1e6 / wall, 1)
            res[f"in_process_{readback}_readback"] = {"wall_s": round(wall, 2), "megapixels_per_s": mps}
    print(f"  in process: {res}", flush=True)
    cmd = [sys.executable, "-m", "tem_ij_plugin", "-q", "predict", str(model_path), str(path), "-o",
           str(work / "stack_probs.tif"), "--device", str(dev), "--dtype", "uint8"]  # fmt: skip
    row = child(cmd, 400)
    row["megapixels_per_s"] = round(planes * side * side / 1e6 / row["wall_s"], 1)
    row["output_bytes"] = (work / "stack_probs.tif").stat().st_size
    res["whole_process_uint8"] = row
    return res


def seams(model, dev, x: np.ndarray) -> dict:
    """The default tiling against one tile over a 2048x2048 crop, fp32 on the GPU."""
    from tem_ij_plugin.predict import make_predictor

    crop = x[:2048, :2048]
    whole = make_predictor(model.net, dev, "torch", "fp32", tile=2048, overlap=0).plane(crop)
    tiled = make_predictor(model.net, dev, "torch", "fp32")
    diff = float(np.abs(tiled.plane(crop) - whole).max())
    return {"tile": tiled.tile, "overlap": tiled.overlap, "max_abs_diff": round(diff, 6)}


def training(data, dev, classes: list, iterations: int, truth: np.ndarray, x_big: np.ndarray) -> dict:
    """The default settings for ``iterations`` iterations on the GPU, fp32 and auto precision."""

    from tem_ij_plugin.annotations import Labels
    from tem_ij_plugin.config import Settings
    from tem_ij_plugin.predict import make_predictor
    from tem_ij_plugin.train import train

    labels = Labels(data["labels"], classes)
    out = {}
    for precision in ("fp32", "auto"):
        s = Settings()
        s.train.max_iterations, s.train.max_minutes, s.train.precision = iterations, 10.0, precision
        t = time.perf_counter()
        model = train(data["train"][None], labels, s, device=str(dev)).model
        wall = time.perf_counter() - t
        last = model.meta["history"]["rounds"][-1]
        done = int(last.get("iterations", iterations))
        probs = make_predictor(model.net, dev, "torch", "fp32").plane(x_big)
        out[precision] = {
            "wall_s": round(wall, 1),
            "iterations": done,
            "iterations_per_s": round(done / wall, 1),
            "round": {k: v for k, v in last.items() if isinstance(v, (int, float, str))},
            "miou": miou(probs.argmax(0), truth),
        }
        print(f"  training {precision}: {out[precision]}", flush=True)
    return out


def run(folder: Path, out: Path, args) -> int:
    import torch

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; run this on the GPU machine (or --device cpu for a smoke test)", file=sys.stderr)
        return 2
    from tem_ij_plugin.io import read_image
    from tem_ij_plugin.modelio import load_model
    from tem_ij_plugin.normalization import normalization_range, normalize

    model_path = folder / "default.model"
    model = load_model(model_path, device=dev)
    big = read_image(folder / "big.tif").data[0]
    data = np.load(folder / "data.npz")
    truth, classes = data["truth"], json.loads((folder / "classes.json").read_text())
    x = normalize(big, *normalization_range(big))
    work = Path(tempfile.mkdtemp(prefix="tem-ij-gpu-"))
    res: dict = {
        "environment": environment() if dev.type == "cuda" else {"device": "cpu"},
        "image": list(big.shape),
        "errors": {},
    }
    print(res["environment"], flush=True)
    sections = [
        ("inprocess", lambda: in_process(model, dev, x, truth, args.repeats)),
        ("uint8_to_probabilities", lambda: uint8_to_probabilities(model, dev, big, args.repeats)),
        ("profile", lambda: profile(model, dev, big, work, args.repeats, args.side)),
        ("files", lambda: files(model_path, dev, folder / "big.tif", work, 5)),
        ("whole_process", lambda: whole_process(model_path, dev, folder / "big.tif", work, 3)),
        ("seams", lambda: seams(model, dev, x)),
        ("stack", lambda: stack(model, model_path, dev, big, work, args.planes, args.side)),
        ("training", lambda: training(data, dev, classes, args.train_iterations, truth, x)),
    ]  # fmt: skip
    for name, fn in sections:
        if args.only and name not in args.only:
            continue
        print(f"{name} ...", flush=True)
        t = time.perf_counter()
        try:
            res[name] = fn()
        except Exception:  # noqa: BLE001 - keep the other sections' figures
            res["errors"][name] = traceback.format_exc()[-3000:]
            print(res["errors"][name], flush=True)
        print(f"{name}: {time.perf_counter() - t:.1f} s", flush=True)
        out.write_text(json.dumps(res, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare", help="train the model and write the data (CPU)")
    p.add_argument("folder", type=Path)
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run", help="the measurements (CUDA)")
    r.add_argument("folder", type=Path)
    r.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "predict_gpu.json")
    r.add_argument("--repeats", type=int, default=10)
    r.add_argument("--planes", type=int, default=100)
    r.add_argument("--side", type=int, default=4096)
    r.add_argument("--train-iterations", type=int, default=300)
    r.add_argument("--device", default="cuda", help="cuda[:N]; cpu only to try the script out")
    r.add_argument("--only", type=lambda v: v.split(","), default=None, help="comma-separated sections")
    args = ap.parse_args(argv)
    if args.step == "prepare":
        prepare(args.folder, args.minutes, args.seed)
        return 0
    return run(args.folder, args.json, args)


if __name__ == "__main__":
    sys.exit(main())

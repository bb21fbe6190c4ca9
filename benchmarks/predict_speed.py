"""Prediction speed on one large image: backends, FLOP efficiency, whole process, RF peer, seams.

Everything is measured in one run on the same synthetic 3840x2920 TEM image (unseen: the model and
the random-forest peer are trained on the partial annotations of a different 1024x1024 synthetic
image, with the same labels):

* the CPU's FP32 peak, measured by ``fma_peak.c`` (independent FMA chains on full-width vector
  registers, one set per thread, compiled here with ``gcc -O2 -march=native``) before and after the
  model timings (the host is shared, so the higher value is used), and torch's sgemm as a practical
  reference; on CPUs with AVX512-BF16 also the bf16 dot-product peak (``fma_peak.c ... bf16``), the
  peak of bf16 convolutions, which ``auto`` runs there;
* the default model's FLOPs per pixel (``torch.utils.flop_counter`` on one tile of the inference
  network, BatchNorm folded) and, per backend, in-process time for the whole image, megapixels/s,
  achieved GFLOP/s and their ratio to the peak; the same for ``auto`` at each ``--tiles`` size, and
  for ``auto`` with every tensor on fresh pages (``fresh pages``: what prediction did before
  ``runtime.reuse_freed_memory``), for a before/after from one run;
* ``tem-ij predict`` as a whole process (start-up, reading, writing included) under ``/usr/bin/time -v``;
* the random-forest peer (skimage multiscale features + sklearn RF, as in ``isbi_partial.py``);
* the seam check: a 2048x2048 crop predicted with the smallest default tiling (4 overlaps) and as one tile.

Times are medians over ``--repeats`` runs. Usage::

    python benchmarks/predict_speed.py                # ~6 minutes on 2 cores
    python benchmarks/predict_speed.py --minutes 1 --repeats 1 --no-rf   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def fma_peak(threads: int, workdir: Path, kind: str = "fp32") -> float | None:
    """GFLOP/s of ``fma_peak.c`` with ``threads`` threads (``kind`` fp32 or bf16), or None without a C
    compiler or, for bf16, without AVX512-BF16."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    exe = workdir / "fma_peak"
    if not exe.exists():
        cmd = [cc, "-O2", "-march=native", "-ffp-contract=fast", "-fopenmp", str(ROOT / "benchmarks" / "fma_peak.c")]
        subprocess.run(cmd + ["-o", str(exe)], check=True)
    out = subprocess.run([str(exe), "200000000", str(threads), kind], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[0]) or None


@contextlib.contextmanager
def fresh_pages():
    """Prediction as before ``runtime.reuse_freed_memory``: inside, that block does nothing."""
    from tem_ij_plugin import predict

    keep = predict.reuse_freed_memory
    predict.reuse_freed_memory = lambda enabled=True: contextlib.nullcontext()
    try:
        yield
    finally:
        predict.reuse_freed_memory = keep


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    import torch

    a, b = torch.rand(n, n), torch.rand(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def flops_per_tile(net, tile: int) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 1, tile, tile))
    return int(counter.get_total_flops())


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def make_data(seed: int):
    """Training image with simulated partial annotations, and the large unseen test image."""
    from tem_ij_plugin.annotations import rasterize
    from tem_ij_plugin.patches import grid
    from tem_ij_plugin.synthetic import SYNTHETIC_CLASSES, make_tem_image, simulate_annotations

    train_img, train_truth = make_tem_image(1024, 1024, seed=seed)
    rng = np.random.default_rng(seed)
    cells = grid((1, 1024, 1024), 256)
    chosen = [cells[i] for i in sorted(rng.choice(len(cells), size=6, replace=False))]
    shapes = simulate_annotations(train_truth, [(p.y0, p.x0, p.y1, p.x1) for p in chosen], SYNTHETIC_CLASSES, rng)
    labels = rasterize(shapes, (1, 1024, 1024), classes=SYNTHETIC_CLASSES)
    big, big_truth = make_tem_image(2920, 3840, seed=seed + 100)
    return train_img, labels, big, big_truth


def computed_pixels(shape, pred, multiple: int) -> int:
    """The pixels the predictor's tiles compute for one plane of ``shape`` (overlaps counted twice)."""
    from tem_ij_plugin.tiling import pad_amounts, tile_specs

    ph, pw = pad_amounts(shape[0], shape[1], multiple, multiple)
    return sum(t.height * t.width for t in tile_specs(shape[0] + ph, shape[1] + pw, pred.tile, pred.overlap, multiple))


def cpu_name() -> str:
    """The CPU's model name (the results differ between the machines of the shared pool)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def whole_process(model_path: Path, image_path: Path, out: Path, backend: str, repeats: int, extra=()) -> dict:
    """Median wall time and the largest peak RSS of ``tem-ij predict`` as a separate process."""
    exe = shutil.which("tem-ij")
    cmd = [exe, "-q", "predict", str(model_path), str(image_path), "-o", str(out), "--backend", backend, *extra]
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    walls, rss = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        res = subprocess.run(timer + cmd, capture_output=True, text=True)
        walls.append(time.perf_counter() - t)
        if res.returncode != 0:
            raise RuntimeError(res.stderr)
        for line in res.stderr.splitlines():
            if "Maximum resident set size" in line:
                rss.append(int(line.split()[-1]) / 1024)
    return {"wall_s": round(float(np.median(walls)), 2), "max_rss_mb": round(max(rss), 0) if rss else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0, help="training budget of the default model")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-rf", action="store_true")
    ap.add_argument("--keep", type=Path, help="copy the trained model and the large image into this folder")
    ap.add_argument("--tiles", type=lambda v: [int(t) for t in v.split(",") if t], default=[],
                    help="also time `auto` at these --tile sizes, in and as a process (comma-separated)")  # fmt: skip
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "predict_speed.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    import torch
    from isbi_partial import miou, rf_peer

    from tem_ij_plugin.backends import cpu_has_native_bf16, onnx_available, precision_report
    from tem_ij_plugin.config import Settings
    from tem_ij_plugin.io import write_hyperstack
    from tem_ij_plugin.modelio import build_network, save_model
    from tem_ij_plugin.normalization import normalization_range, normalize
    from tem_ij_plugin.predict import make_predictor, probe_crop
    from tem_ij_plugin.receptive import fold_batchnorm
    from tem_ij_plugin.train import train

    threads = torch.get_num_threads()
    work = Path(tempfile.mkdtemp(prefix="tem-ij-speed-"))
    res: dict = {"threads": threads, "torch": torch.__version__, "image": [2920, 3840], "cpu": cpu_name()}
    res["cpu_native_bf16"] = cpu_has_native_bf16()
    try:
        print("data ...", flush=True)
        train_img, labels, big, big_truth = make_data(args.seed)
        print(f"training the default model for {args.minutes} min ...", flush=True)
        s = Settings()
        s.train.max_minutes = args.minutes
        s.train.seed = args.seed
        model = train(train_img[None], labels, s, device="cpu").model
        net = model.net.eval()
        lo, hi = normalization_range(big)
        x = normalize(big, lo, hi)
        mp = big.size / 1e6

        peak_before = fma_peak(threads, work)
        bf16_before = fma_peak(threads, work, "bf16")
        res["sgemm_gflops"] = round(sgemm_gflops(), 1)
        configs = [("auto", "auto", None)] + ([("onnx", "fp32", None)] if onnx_available() else [])
        configs += [("torch", "fp32", None), ("torch", "bf16", None)]
        configs += [("auto", "int8", None)] if onnx_available() else []
        configs += [("auto", "auto", tile) for tile in args.tiles]  # other tile sizes, same run
        configs += [("auto", "auto", "fresh pages")]
        probe = np.ascontiguousarray(probe_crop(x))
        infer = fold_batchnorm(net)
        ref = None
        res["backends"] = {}
        for backend, precision, variant in configs:
            tile = variant if isinstance(variant, int) else None
            # bf16 runs unchecked here so that its speed and error are measured; `tem-ij predict` checks
            # it on the probe (precision_report) and falls back to fp32 when it fails.
            pred = make_predictor(
                net, torch.device("cpu"), backend, precision, tile=tile, probe=probe if backend == "auto" else None
            )
            if precision == "int8":  # calibrated and checked on the probe by make_predictor itself
                checked = pred.precision
            elif precision not in ("fp32", "auto"):
                from tem_ij_plugin.backends import _check_reduced_precision

                checked = _check_reduced_precision(fold_batchnorm(net), torch.device("cpu"), precision, probe)
            pred.plane(x[:512, :512])  # warm-up (allocations, onnxruntime's first run)
            out = {}

            def run(pred=pred, out=out):
                out["p"] = pred.plane(x)

            with fresh_pages() if variant == "fresh pages" else contextlib.nullcontext():
                t = median_time(run, args.repeats)
            computed = computed_pixels(x.shape, pred, net.size_multiple)
            fl = flops_per_tile(infer, pred.tile)
            row = {
                "precision": pred.precision,
                "tile": pred.tile,
                "overlap": pred.overlap,
                "batch": pred.batch_size,
                "receptive_field_radius": pred.halo,
                "seconds": round(t, 2),
                "megapixels_per_s": round(mp / t, 2),
                "model_kflop_per_pixel": round(fl / pred.tile**2 / 1e3, 1),
                "gflop_per_s": round(computed * fl / pred.tile**2 / t / 1e9, 1),
                # the same, counting only the image's own pixels: tile overlap counts against it
                "useful_gflop_per_s": round(x.size * fl / pred.tile**2 / t / 1e9, 1),
                "computed_pixels_per_image_pixel": round(computed / x.size, 3),
                "miou": round(miou(out["p"].argmax(0).astype(np.int64), big_truth.astype(np.int64)), 4),
            }
            if precision not in ("fp32", "auto"):
                row["passes_precision_check"] = checked == precision
            if ref is None:
                ref = out["p"]
            else:
                row["max_diff_vs_first"] = round(float(np.abs(out["p"] - ref).max()), 5)
                # the acceptance test over the whole image, not just the probe
                whole = precision_report(ref, out["p"])
                row["whole_image_vs_first"] = {k: round(v, 5) if isinstance(v, float) else v for k, v in whole.items()}
            row["backend"] = pred.backend.name
            suffix = f"-tile-{tile}" if tile else ("-fresh-pages" if variant else "")
            res["backends"][f"{backend}-{precision}{suffix}"] = row
            print(f"  {backend} {pred.precision}: {row}", flush=True)
        # The backend on a wider U-Net (32 base channels, random weights): convolutions with more channels
        # do more arithmetic per byte moved, which shows how much of the gap to the peak is the model's.
        wide_arch = {"n_classes": 2, **s.model.model_dump(), "base_channels": 32}
        wide = build_network(wide_arch).eval()
        crop = np.ascontiguousarray(x[:2048, :2048])
        for backend in (["onnx"] if onnx_available() else []) + ["torch"]:
            pred = make_predictor(wide, torch.device("cpu"), backend, "fp32", halo=35)
            pred.plane(crop[:512, :512])
            t = median_time(lambda pred=pred: pred.plane(crop), args.repeats)
            computed = computed_pixels(crop.shape, pred, wide.size_multiple)
            fl = flops_per_tile(fold_batchnorm(wide), pred.tile)
            row = {
                "backend": backend,
                "image": list(crop.shape),
                "seconds": round(t, 2),
                "model_kflop_per_pixel": round(fl / pred.tile**2 / 1e3, 1),
                "gflop_per_s": round(computed * fl / pred.tile**2 / t / 1e9, 1),
            }
            res.setdefault("wide_unet_32", {})[backend] = row
            print(f"  base-32 U-Net {backend}: {row}", flush=True)
        peak_after = fma_peak(threads, work)
        peaks = [p for p in (peak_before, peak_after) if p is not None]
        res["fp32_peak_gflops"] = {"before": peak_before, "after": peak_after, "used": max(peaks) if peaks else None}
        bf16_peaks = [p for p in (bf16_before, fma_peak(threads, work, "bf16")) if p is not None]
        if bf16_peaks:
            res["bf16_peak_gflops"] = max(bf16_peaks)
            for row in res["backends"].values():
                if row["precision"] == "bf16":
                    row["useful_fraction_of_bf16_peak"] = round(row["useful_gflop_per_s"] / max(bf16_peaks), 3)
        if peaks:
            for row in list(res["backends"].values()) + list(res.get("wide_unet_32", {}).values()):
                row["fraction_of_fp32_peak"] = round(row["gflop_per_s"] / max(peaks), 3)
                if "useful_gflop_per_s" in row:
                    row["useful_fraction_of_fp32_peak"] = round(row["useful_gflop_per_s"] / max(peaks), 3)

        # Seams: the smallest default tiling (4 overlaps, where memory is short) against one tile over
        # a 2048x2048 crop, which the largest default tile covers whole. (256-pixel tiles, as before,
        # are refused for a model whose receptive field asks for an overlap of 256 px or more.)
        crop = x[:2048, :2048]
        whole = make_predictor(net, torch.device("cpu"), "torch", "fp32", tile=2048, overlap=0).plane(crop)
        small = 4 * make_predictor(net, torch.device("cpu"), "torch", "fp32").overlap
        tiled = make_predictor(net, torch.device("cpu"), "torch", "fp32", tile=small)
        bare = make_predictor(net, torch.device("cpu"), "torch", "fp32", tile=tiled.tile, overlap=0).plane(crop)
        res["seams"] = {
            "tile": tiled.tile,
            "overlap": tiled.overlap,
            "max_abs_diff": round(float(np.abs(tiled.plane(crop) - whole).max()), 5),
            "max_abs_diff_without_overlap": round(float(np.abs(bare - whole).max()), 5),
        }
        print(f"  seams: {res['seams']}", flush=True)

        # Whole process, start-up and file I/O included.
        model_path, image_path = work / "default.model", work / "big.tif"
        save_model(model_path, model)
        write_hyperstack(image_path, big[None])
        res["whole_process"] = {}
        for backend in (["auto"] if onnx_available() else []) + ["torch"]:
            row = whole_process(model_path, image_path, work / "out.tif", backend, args.repeats)
            res["whole_process"][backend] = row
            print(f"  tem-ij predict --backend {backend}: {row}", flush=True)
        if onnx_available():
            row = whole_process(model_path, image_path, work / "out.tif", "auto", args.repeats, ["--precision", "int8"])
            res["whole_process"]["auto-int8"] = row
            print(f"  tem-ij predict --precision int8: {row}", flush=True)
        for tile in args.tiles:  # larger tiles: fewer overlaps, more memory
            row = whole_process(model_path, image_path, work / "out.tif", "auto", args.repeats, ["--tile", str(tile)])
            res["whole_process"][f"auto-tile-{tile}"] = row
            print(f"  tem-ij predict --tile {tile}: {row}", flush=True)

        if not args.no_rf:
            pred, fit_s, pred_s = rf_peer(train_img[None], labels.labels, big[None], args.seed)
            res["rf_peer"] = {
                "fit_s": round(fit_s, 1),
                "predict_s": round(pred_s, 2),
                "megapixels_per_s": round(mp / pred_s, 2),
                "miou": round(miou(pred[0].astype(np.int64), big_truth.astype(np.int64)), 4),
            }
            print(f"  RF peer: {res['rf_peer']}", flush=True)
    finally:
        if args.keep:  # the model and the image, for benchmarks/int8_onnx.py
            args.keep.mkdir(parents=True, exist_ok=True)
            for name in ("default.model", "big.tif"):
                if (work / name).exists():
                    shutil.copyfile(work / name, args.keep / name)
        shutil.rmtree(work, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

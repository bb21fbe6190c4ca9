"""int8 calibration: on which crops, and does the probe check predict the whole image?

``tem-ij predict --precision int8`` calibrates onnxruntime's static quantisation on the probe (the
centre 512x512 of the first plane) and then checks int8 against fp32 on that same probe. This script
compares calibration sets, and for each reports :func:`tem_ij_plugin.backends.precision_report` on
the probe and on every pixel of the image (all planes of a stack):

* ``probe``: the probe alone (the shipped rule; the probe check is then in-sample);
* ``spread``: crops of the probe's size spread over the image (the four quadrant centres of a large
  plane; the centre of planes at 1/4, 1/2 and 3/4 of a stack of small ones), not the probe, which then
  checks crops the calibration never saw;
* ``spread+probe``: both.

``--keep-fp32 ends,full-res`` adds variants calibrated on the probe that leave convolutions in fp32:
``ends`` the first and the last and the softmax (the image's own rounding and the logits), ``full-res`` every
convolution at full resolution (the first two and the last three, which holds for a single-step network
like both benchmarked here); the JSON also gets each variant's
int8 seconds for the whole image, which are only comparable within a run on a quiet machine.

Accuracy only (fp32 and int8 use the same tiles), so a busy machine does not change the numbers.

    python benchmarks/int8_calibration.py MODEL IMAGE.tif [MODEL IMAGE.tif ...] --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np


def spread_crops(stack: np.ndarray, size: int) -> list:
    """Crops of ``size`` spread over a (Z, Y, X) stack, clear of the probe (centre of plane 0).

    Planes of at least 4 x ``size`` a side: the four quadrant centres of plane 0 (they cannot touch
    its centre crop); smaller planes: the centres of planes at 1/4, 1/2 and 3/4 of the stack; a single
    small plane: none.
    """
    z, h, w = stack.shape
    if min(h, w) >= 4 * size:
        return [
            stack[0, y - size // 2 : y + size // 2, x - size // 2 : x + size // 2]
            for y in (h // 4, 3 * h // 4)
            for x in (w // 4, 3 * w // 4)
        ]
    from tem_ij_plugin.predict import probe_crop

    planes = sorted({max(1, z // 4), z // 2, 3 * z // 4} - {0}) if z > 1 else []
    return [probe_crop(stack[i], size) for i in planes]


KEEP_FP32 = {  # the softmax too: onnxruntime would otherwise quantise its input, the logits
    "ends": lambda convs, softmax: [convs[0], convs[-1]] + softmax,
    "full-res": lambda convs, softmax: convs[:2] + convs[-3:] + softmax,
}


def evaluate(model_path: Path, image_path: Path, keep: list[str]) -> dict:
    import torch

    from tem_ij_plugin.apply import load_segmenter
    from tem_ij_plugin.backends import precision_report
    from tem_ij_plugin.io import read_image
    from tem_ij_plugin.normalization import normalize, sampled_range
    from tem_ij_plugin.predict import PROBE_SIZE, make_predictor, probe_crop

    model = load_segmenter(model_path, "cpu")
    data = read_image(image_path).data
    stack = data.reshape((-1,) + data.shape[-2:])
    lo, hi = sampled_range(lambda i: stack[i], stack.shape[0], model.meta["normalization"])
    x = np.stack([normalize(p, lo, hi).astype(np.float32) for p in stack])
    probe = probe_crop(x[0])
    fp32 = make_predictor(model.net, torch.device("cpu"), "onnx", "fp32")
    t0 = time.perf_counter()
    ref = np.stack([fp32.plane(p) for p in x])
    fp32_seconds = time.perf_counter() - t0
    ref_probe = fp32.backend(probe[None, None])[0]
    spread = spread_crops(x, PROBE_SIZE)
    out = {"model": str(model_path), "image": str(image_path), "shape": list(stack.shape), "spread_crops": len(spread),
           "fp32_seconds": round(fp32_seconds, 2)}  # fmt: skip
    variants = {"probe": ([probe], [])}
    if spread:  # without spread crops, "spread+probe" would be the probe alone under another name
        variants.update({"spread": (spread, []), "spread+probe": (spread + [probe], [])})
    nodes = fp32.backend.node_names("Conv"), fp32.backend.node_names("Softmax")
    variants.update({f"probe, {k} fp32": ([probe], KEEP_FP32[k](*nodes)) for k in keep})
    for name, (crops, kept) in variants.items():
        low = copy.copy(fp32)
        low.backend = fp32.backend.quantized(crops, keep_fp32=kept)
        t0 = time.perf_counter()
        whole = np.stack([low.plane(p) for p in x])
        seconds = time.perf_counter() - t0
        on_probe = precision_report(ref_probe, low.backend(probe[None, None])[0])
        on_image = precision_report(ref.transpose(1, 0, 2, 3), whole.transpose(1, 0, 2, 3))
        out[name] = {"probe": on_probe, "image": on_image, "kept_fp32": kept, "int8_seconds": round(seconds, 2)}
        print(f"{image_path.name} {name:22s} probe {_line(on_probe)} | image {_line(on_image)} | {seconds:.1f} s",
              flush=True)  # fmt: skip
    return out


def _line(r: dict) -> str:
    ok = "pass" if r["accepted"] else "FAIL"
    return f"agree {r['agreement']:.5f} minIoU {r['min_iou']:.4f} flip {r['flip_margin']:.3f} {ok}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="+", type=Path, help="MODEL IMAGE pairs")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep-fp32", default="", help="comma-separated: ends, full-res (see above)")
    args = ap.parse_args(argv)
    if len(args.pairs) % 2:
        ap.error("give MODEL IMAGE pairs")
    keep = [k for k in args.keep_fp32.split(",") if k]
    if unknown := set(keep) - set(KEEP_FP32):
        ap.error(f"unknown --keep-fp32 {', '.join(sorted(unknown))}; use {', '.join(KEEP_FP32)}")
    runs = [evaluate(m, i, keep) for m, i in zip(args.pairs[::2], args.pairs[1::2])]
    if args.json:
        args.json.write_text(json.dumps({"runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

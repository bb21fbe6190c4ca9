"""int8 prediction with onnxruntime's static quantisation: speed and the precision acceptance test.

A look at whether int8 (VNNI on CPUs that have it) could become a prediction precision. The model's
fp32 ONNX graph (BatchNorm folded) is quantised as ``tem-ij predict --precision int8`` does it
(:meth:`tem_ij_plugin.backends.OnnxBackend.quantized`, calibrated on the image's probe); then one
tile of ``--tile`` pixels is timed in fp32 and int8 (medians), and the whole image
is compared with fp32 by :func:`tem_ij_plugin.backends.precision_report` (class agreement, lowest
class IoU, the fp32 margin where a class changed).

    python benchmarks/int8_onnx.py MODEL IMAGE.tif [--tile 960] [--json out.json]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict_speed import median_time  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("image", type=Path)
    ap.add_argument("--tile", type=int, default=960)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch

    from tem_ij_plugin.apply import load_segmenter
    from tem_ij_plugin.backends import OnnxBackend, precision_report
    from tem_ij_plugin.io import read_image
    from tem_ij_plugin.normalization import normalization_range, normalize
    from tem_ij_plugin.predict import make_predictor, probe_crop
    from tem_ij_plugin.receptive import fold_batchnorm

    model = load_segmenter(args.model, "cpu")
    image = read_image(args.image).data[0].astype(np.float32)
    lo, hi = normalization_range(image)
    x = normalize(image, lo, hi).astype(np.float32)
    fp32 = OnnxBackend(fold_batchnorm(model.net).float())
    t = time.perf_counter()
    int8 = fp32.quantized(probe_crop(x))
    quantize_s = time.perf_counter() - t
    sessions = {"fp32": fp32.session, "int8": int8.session}
    mult = model.net.size_multiple
    tile = np.ascontiguousarray(x[: args.tile // mult * mult, : args.tile // mult * mult])[None, None]
    res: dict = {"tile": list(tile.shape[-2:]), "threads": torch.get_num_threads(), "quantize_s": round(quantize_s, 2)}
    for name, sess in sessions.items():
        sess.run(None, {"image": tile})  # warm-up
        res[f"{name}_tile_s"] = round(median_time(lambda s=sess: s.run(None, {"image": tile}), args.repeats), 3)
    res["speedup"] = round(res["fp32_tile_s"] / res["int8_tile_s"], 2)

    # The whole image through our tiled predictor, with the int8 session as its backend
    pred = make_predictor(model.net, torch.device("cpu"), "onnx", "fp32")
    ref = pred.plane(x)
    pred.backend.session = sessions["int8"]
    low = pred.plane(x)
    res["whole_image"] = {k: round(v, 5) if isinstance(v, float) else v for k, v in precision_report(ref, low).items()}
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

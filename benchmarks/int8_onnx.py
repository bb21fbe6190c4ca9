"""int8 prediction with onnxruntime's static quantisation: speed and the precision acceptance test.

A look at whether int8 (VNNI on CPUs that have it) could become a prediction precision. The model's
fp32 ONNX graph (BatchNorm folded, as ``tem-ij predict`` exports it) is quantised to QDQ int8 with
per-channel weights, calibrated on a few crops of the image itself (what ``predict`` would have at
start-up); then one tile of ``--tile`` pixels is timed in fp32 and int8 (medians), and the whole image
is compared with fp32 by :func:`tem_ij_plugin.backends.precision_report` (class agreement, lowest
class IoU, the fp32 margin where a class changed).

    python benchmarks/int8_onnx.py MODEL IMAGE.tif [--tile 960] [--json out.json]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict_speed import median_time  # noqa: E402


def _calibration_reader(x: np.ndarray, size: int, count: int):
    from onnxruntime.quantization import CalibrationDataReader

    rng = np.random.default_rng(0)
    h, w = x.shape
    crops = []
    for _ in range(count):
        y0, x0 = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        crops.append(np.ascontiguousarray(x[y0 : y0 + size, x0 : x0 + size])[None, None])

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(crops)

        def get_next(self):
            crop = next(self.items, None)
            return None if crop is None else {"image": crop}

    return Reader()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("image", type=Path)
    ap.add_argument("--tile", type=int, default=960)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calibration-crops", type=int, default=8)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from tem_ij_plugin.apply import load_segmenter
    from tem_ij_plugin.backends import export_onnx, precision_report
    from tem_ij_plugin.io import read_image
    from tem_ij_plugin.normalization import normalization_range, normalize
    from tem_ij_plugin.predict import make_predictor
    from tem_ij_plugin.receptive import fold_batchnorm

    model = load_segmenter(args.model, "cpu")
    image = read_image(args.image).data[0].astype(np.float32)
    lo, hi = normalization_range(image)
    x = normalize(image, lo, hi).astype(np.float32)
    work = Path(tempfile.mkdtemp(prefix="tem-ij-int8-"))
    fp32_path, int8_path = work / "fp32.onnx", work / "int8.onnx"
    fp32_path.write_bytes(export_onnx(fold_batchnorm(model.net).float()))
    t = time.perf_counter()
    reader = _calibration_reader(x, 256, args.calibration_crops)
    quantize_static(str(fp32_path), str(int8_path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
    quantize_s = time.perf_counter() - t

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sessions = {
        name: ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for name, path in (("fp32", fp32_path), ("int8", int8_path))
    }
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

"""CPU tile size: time per plane and per computed pixel, and peak memory, for a list of tile sizes.

In process, one plane (the large image ``predict_speed.py --keep DIR`` keeps, or any 2-D TIFF), a
model file or a random-weight network of a given depth (speed does not depend on the weights; its
receptive field is set with ``--halo``, since random weights have a small one). Per tile size: the
median of ``--repeats`` passes, the computed pixels per image pixel (the overlap's waste), seconds per
million computed pixels (what a larger tile costs per pixel) and the process's peak resident memory
so far (sizes in increasing order, so each row's peak is its own or an earlier, smaller tile's).

    python benchmarks/predict_tiles.py /tmp/speed/big.tif --model /tmp/speed/default.model
    python benchmarks/predict_tiles.py /tmp/speed/big.tif --depth 4 --halo 35 --backend onnx --precision fp32
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image", type=Path, help="a 2-D image (TIFF)")
    ap.add_argument("--model", type=Path, help="a model file (default: random weights, see --depth)")
    ap.add_argument("--depth", type=int, default=5, help="U-Net depth of the random-weight network")
    ap.add_argument("--halo", type=int, help="receptive field radius in px (default: the model's)")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--tiles", default="1024,1536,2048,3072")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the rows here too")
    args = ap.parse_args(argv)

    import tifffile
    import torch
    from predict_speed import computed_pixels

    from tem_ij_plugin.modelio import build_network, load_model
    from tem_ij_plugin.normalization import normalization_range, normalize
    from tem_ij_plugin.predict import make_predictor

    if args.model:
        model = load_model(args.model)
        erf = model.meta.get("effective_receptive_field") or {}
        net, halo = model.net.eval(), args.halo or erf.get("radius")
    else:
        arch = {"n_classes": 2, "depth": args.depth, "base_channels": 16, "steps": 1, "norm": "batch"}
        net, halo = build_network(arch).eval(), args.halo
    image = tifffile.imread(args.image)
    image = image.reshape(image.shape[-2:]) if image.ndim > 2 else image
    x = normalize(image, *normalization_range(image))
    rows = []
    for tile in sorted(int(t) for t in args.tiles.split(",")):
        pred = make_predictor(net, torch.device("cpu"), args.backend, args.precision, tile=tile, halo=halo)
        pred.plane(x[:512, :512])  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            pred.plane(x)
            times.append(time.perf_counter() - t0)
        seconds = float(np.median(times))
        computed = computed_pixels(x.shape, pred, net.size_multiple)
        row = {
            "backend": pred.backend.name,
            "precision": pred.precision,
            "tile": pred.tile,
            "overlap": pred.overlap,
            "seconds": round(seconds, 2),
            "runs": [round(t, 2) for t in times],
            "computed_pixels_per_image_pixel": round(computed / x.size, 3),
            "seconds_per_computed_megapixel": round(seconds / computed * 1e6, 4),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"image": list(x.shape), "model": str(args.model) if args.model else f"random, depth {args.depth}"}
        args.json.write_text(json.dumps({**meta, "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

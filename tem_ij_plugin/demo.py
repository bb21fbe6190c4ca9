"""The built-in demo: synthetic TEM image -> simulated partial polygons -> train -> predict -> figure."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from .errors import UserError
from .metrics import class_iou, confusion

log = logging.getLogger(__name__)


DEMO_FILES = {"image.tif", "truth.tif", "RoiSet.zip", "demo.model", "probabilities.tif", "demo.png"}


def _demo_of_version_0_2(folder: Path) -> bool:
    """An unmarked folder holding nothing but the demo's own files, with the demo's model among them."""
    from .modelio import read_metadata

    try:
        names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
        if not names or not names <= DEMO_FILES or "demo.model" not in names:
            return False
        read_metadata(folder / "demo.model")
    except (OSError, UserError):
        return False
    return True


def run_demo(
    out_dir: Path, minutes: float = 1.5, seed: int = 0, device: str = "auto", size: int = 768, n_patches: int = 5
) -> str:
    """Run the whole job on a synthetic image and write image, ROIs, model, probabilities and a figure.

    Returns
    -------
    str
        A short report with the IoU against the ground truth and the files written.
    """
    import imageio.v3 as iio

    from .annotations import rasterize
    from .config import Settings
    from .figures import patch_overlay, probability_rgb, side_by_side, to_rgb
    from .io import Calibration, read_image, read_rois, write_hyperstack, write_rois
    from .modelio import save_model
    from .outputs import claim_folder
    from .patches import grid
    from .predict import predict_stack
    from .runtime import resolve_device
    from .synthetic import SYNTHETIC_CLASSES, make_tem_image, simulate_annotations
    from .train import train

    start = time.perf_counter()
    dev = resolve_device(device)
    if _demo_of_version_0_2(out_dir):  # written before demo folders were marked
        (out_dir / ".tem-ij").write_text("tem-ij demo\n", encoding="utf-8")
    claim_folder(out_dir, "tem-ij demo")
    settings = Settings()
    settings.train.max_minutes = minutes
    settings.train.seed = seed
    psize = settings.patches.size
    rng = np.random.default_rng(seed)

    image, truth = make_tem_image(size, size, seed=seed)
    cal = Calibration(pixel_width=0.004, pixel_height=0.004, unit="µm")
    write_hyperstack(out_dir / "image.tif", image[None], cal)
    write_hyperstack(out_dir / "truth.tif", truth[None], cal)
    cells = grid((1, size, size), psize)
    chosen = [cells[i] for i in sorted(rng.choice(len(cells), size=min(n_patches, len(cells)), replace=False))]
    shapes = simulate_annotations(truth, [(p.y0, p.x0, p.y1, p.x1) for p in chosen], SYNTHETIC_CLASSES, rng)
    write_rois(out_dir / "RoiSet.zip", shapes)
    log.info("demo: %dx%d synthetic TEM image, %d polygons on %d patches", size, size, len(shapes), len(chosen))

    # Read back what was written, exactly as `tem-ij train image.tif --rois RoiSet.zip` would.
    img = read_image(out_dir / "image.tif")
    labels = rasterize(read_rois(out_dir / "RoiSet.zip"), img.data.shape)
    result = train(img.data, labels, settings, device=str(dev), calibration=img.calibration.as_dict())
    save_model(out_dir / "demo.model", result.model)
    net = result.model.net.to(dev)
    probs = predict_stack(net, img.data, result.model.normalization, dev)
    write_hyperstack(out_dir / "probabilities.tif", probs, img.calibration, channel_names=result.model.classes)

    # A second, unseen synthetic image shows whether the model generalises beyond its own image.
    other, other_truth = make_tem_image(size, size, seed=seed + 1000)
    other_probs = predict_stack(net, other[None], result.model.normalization, dev)
    pred = probs[0].argmax(0)
    unannotated = labels.labels[0] < 0
    iou_all = class_iou(confusion(pred, truth, 2))
    iou_unlabelled = class_iou(confusion(np.where(unannotated, pred, -1), truth, 2))
    iou_other = class_iou(confusion(other_probs[0].argmax(0), other_truth, 2))

    lab2d = labels.labels[0]
    train_p = [p for p in result.train_patches if p.z == 0]
    val_p = [p for p in result.val_patches if p.z == 0]
    figure = side_by_side(
        [to_rgb(image), probability_rgb(probs[0, 1]), patch_overlay(image, lab2d, psize, train_p, val_p)]
    )
    iio.imwrite(out_dir / "demo.png", figure)
    rounds = result.model.last_round
    elapsed = time.perf_counter() - start
    return "\n".join(
        [
            f"tem-ij demo: {size}x{size} synthetic TEM image, {len(shapes)} polygons on {len(chosen)} patches "
            f"({len(train_p)} training, {len(val_p)} validation), {int((lab2d >= 0).sum())} labelled pixels "
            f"({(lab2d >= 0).mean():.1%} of the image)",
            f"training: {rounds['iterations']} iterations, {rounds['duration_s']:.0f} s, "
            f"stopped by {result.stop_reason}, "
            f"{rounds['backtracks']} backtrack(s), {_best(rounds, bool(result.val_patches))}",
            f"IoU vs ground truth (background, cell): whole image {iou_all[0]:.3f}, {iou_all[1]:.3f}; "
            f"unlabelled pixels only {iou_unlabelled[0]:.3f}, {iou_unlabelled[1]:.3f}; "
            f"unseen image {iou_other[0]:.3f}, {iou_other[1]:.3f}",
            f"mIoU whole image {np.nanmean(iou_all):.3f}, unseen image {np.nanmean(iou_other):.3f}",
            f"wrote {out_dir}/: image.tif, truth.tif, RoiSet.zip, demo.model, probabilities.tif, demo.png "
            f"(total {elapsed:.0f} s on {dev})",
        ]
    )


def _best(record: dict, validated: bool) -> str:
    """The score training selected by: validation mIoU, or the training loss when no patch was held out."""
    if validated:
        return f"best validation mIoU {record['best_score']:.3f}"
    return f"no validation patch (fewer than 8 annotated): lowest smoothed training loss {-record['best_score']:.3f}"

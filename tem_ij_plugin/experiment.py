"""Simulated annotation rounds on an image with full ground truth: random vs suggested patches.

A simulated annotator outlines partial polygons (:func:`synthetic.simulate_annotations`) on the
patches each arm picks; every round retrains from the previous round's model (warm start) and is
scored on held-out pixels that no arm may annotate. ``random`` draws unused pool patches at random,
``suggest`` asks :func:`suggest.suggest`; both arms run with the same seeds. The random-forest peer
learns from the random arm's labels in the same rounds.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import Cancelled, UserError
from .metrics import miou

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .config import Settings
    from .events import CancelToken

log = logging.getLogger(__name__)

ARMS = ("random", "suggest")
# Benchmark arms (not run by default): suggest-novel damps look-alikes of annotated patches,
# suggest-mix (explore=0.5) makes every second patch of a round, from its second on, a typical one
# unlike the annotated patches.
KNOWN_ARMS = ARMS + ("suggest-novel", "suggest-mix")
DEFAULT_SCHEDULE = (1, 2, 3, 5, 8, 12, 15)


def split_grid(
    shape: tuple[int, ...], size: int, test_fraction: float, seed: int = 12345
) -> tuple[np.ndarray, np.ndarray]:
    """Grid cells split into an annotation pool and held-out test cells (seeded, fixed across arms).

    Returns
    -------
    pool : ndarray of int, shape (N, 5)
    test_mask : ndarray of bool, shape (Z, Y, X)
    """
    from .suggest import candidate_boxes

    cells = candidate_boxes(shape, size)
    if not 0 < test_fraction < 1:
        raise UserError("the test fraction must be between 0 and 1")
    n_test = max(1, int(round(test_fraction * len(cells))))
    if len(cells) - n_test < 2:
        raise UserError(f"the image has only {len(cells)} patch(es) of {size} px: too few to hold some out")
    rng = np.random.default_rng(seed)
    test_idx = rng.choice(len(cells), n_test, replace=False)
    mask = np.zeros(shape, bool)
    for z, y0, x0, y1, x1 in cells[test_idx]:
        mask[z, y0:y1, x0:x1] = True
    return np.delete(cells, test_idx, axis=0), mask


def _window_error(pred: np.ndarray, truth: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    return np.array([(pred[z, y0:y1, x0:x1] != truth[z, y0:y1, x0:x1]).mean() for z, y0, x0, y1, x1 in boxes])


def run_experiment(
    image: np.ndarray,
    truth: np.ndarray,
    classes: list,
    pool: np.ndarray,
    test_mask: np.ndarray,
    settings: Settings | None = None,
    arms: Sequence[str] = ARMS,
    schedule: Sequence[int] = DEFAULT_SCHEDULE,
    seeds: Sequence[int] = (0,),
    rf: bool = True,
    device: str = "auto",
    out_dir: Path | None = None,
    figures: bool = True,
    progress: Callable[[dict], None] | None = None,
    cancel: CancelToken | None = None,
) -> dict:
    """Run both arms over the schedule for every seed.

    Parameters
    ----------
    image : ndarray, shape (Z, Y, X)
    truth : ndarray of int, shape (Z, Y, X)
        Dense ground truth, class indices into ``classes``.
    classes : list of str
    pool : ndarray of int, shape (N, 5)
        Patches (z, y0, x0, y1, x1) the annotator may be asked to outline.
    test_mask : ndarray of bool, shape (Z, Y, X)
        Pixels that are scored (never annotated).
    settings : Settings, optional
        Training settings of every round (``train.seed`` is set per seed).
    arms : sequence of str
        ``random`` and/or ``suggest``; ``suggest-novel`` is suggest with ``novelty=True``,
        ``suggest-mix`` with ``explore=0.5``.
    schedule : sequence of int
        Annotated patch counts after each round, increasing.
    seeds : sequence of int
    rf : bool
        Also score the random-forest peer on the random arm's labels (first arm's without it).
    out_dir : Path, optional
        Where per-round montages are written (``montage-<arm>-s<seed>-r<NN>.png``).
    progress : callable, optional
        Called after every round with ``{"done", "total", "arm", "seed", "patches", "miou", "row"}``
        (``row``: the round's table row, so a caller can keep partial results).
    cancel : threading.Event, optional

    Returns
    -------
    dict
        ``rows`` (one per seed, arm and round) and ``summary`` (per arm: mean curve, area under it).
    """
    from .runtime import resolve_device

    schedule = _checked_schedule(schedule, pool, arms, test_mask)
    dev = resolve_device(device)  # before the forest's features: a bad device fails at once
    peer = None
    if rf:
        from .peer import RandomForestPeer

        peer = RandomForestPeer(image)
    setup = _Setup(image, truth, list(classes), pool, test_mask, settings, dev, peer)
    peer_arm = "random" if "random" in arms else arms[0]
    rows, frames = [], {}
    total = len(seeds) * len(arms) * len(schedule)
    for seed in seeds:
        for arm in arms:
            run = _ArmRun(setup, arm, seed, with_peer=arm == peer_arm)
            for target in schedule:
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                row, result, probs = run.round(target, cancel)
                rows.append(row)
                if figures and out_dir is not None:
                    train_p = [p.as_list() for p in result.train_patches]
                    val_p = [p.as_list() for p in result.val_patches]
                    frame = montage(image, probs, pool, train_p, val_p, test_mask, title=_title(row))
                    frames.setdefault((arm, seed), []).append(frame)
                    _write_png(out_dir / f"montage-{arm}-s{seed}-r{len(frames[arm, seed]):02d}.png", frame)
                if progress is not None:
                    done = {"done": len(rows), "total": total, "arm": arm, "seed": seed}
                    progress({**done, "patches": row["patches"], "miou": row["miou"], "row": row})
    out = {"classes": list(classes), "schedule": schedule, "seeds": list(seeds), "arms": list(arms), "rows": rows}
    out["summary"] = summarize(rows, schedule, arms)
    if out_dir is not None and figures:
        for (arm, seed), fr in frames.items():
            _write_gif(out_dir / f"rounds-{arm}-s{seed}.gif", fr)
    return out


def _checked_schedule(schedule, pool, arms, test_mask) -> list:
    """The schedule sorted and deduplicated, after checking it, the arms and the held-out pixels."""
    schedule = sorted(set(int(s) for s in schedule))
    if not schedule or schedule[0] < 1:
        raise UserError("the schedule must list patch counts of at least 1")
    if schedule[-1] > len(pool):
        raise UserError(f"the schedule goes to {schedule[-1]} patches but the pool has only {len(pool)}")
    bad = [a for a in arms if a not in KNOWN_ARMS]
    if bad:
        raise UserError(f"unknown arm(s) {', '.join(bad)}; use {', '.join(KNOWN_ARMS)}")
    if not test_mask.any():
        raise UserError("no held-out pixels to score")
    return schedule


@dataclass
class _Setup:
    """What every arm of an experiment shares."""

    image: np.ndarray
    truth: np.ndarray
    classes: list
    pool: np.ndarray
    test_mask: np.ndarray
    settings: object
    device: object
    peer: object


class _ArmRun:
    """One arm with one seed: its picks, its simulated annotations and its model, round after round."""

    def __init__(self, setup: _Setup, arm: str, seed: int, with_peer: bool):
        self.setup, self.arm, self.seed = setup, arm, seed
        self.peer = setup.peer if with_peer else None
        self.rng = np.random.default_rng(seed)
        self.ann_rng = np.random.default_rng(seed + 1)
        self.chosen: list = []
        self.declined: set = set()
        self.shapes: list = []
        self.labels = self.model = self.probs = self.pred = None

    def round(self, target: int, cancel) -> tuple:
        """Annotate up to ``target`` patches, retrain (warm start) and score; returns (row, result, probs)."""
        from .annotations import rasterize
        from .config import Settings
        from .predict import predict_stack
        from .train import train

        st, t0 = self.setup, time.perf_counter()
        need = target - len(self.chosen)
        unused = np.array([i for i in range(len(st.pool)) if i not in self.chosen and i not in self.declined])
        order, analysis = self._order(need, unused)
        picks = self._annotate(order, need)
        self.chosen += picks
        self.labels = rasterize(self.shapes, st.image.shape, classes=st.classes)
        s = (st.settings or Settings()).model_copy(deep=True)
        s.train.seed = self.seed
        result = train(st.image, self.labels, s, init=self.model, device=str(st.device), cancel=cancel)
        self.model = result.model
        self.probs = predict_stack(self.model.net.to(st.device), st.image, self.model.normalization, st.device)
        self.model.net.cpu()
        self.pred = self.probs.argmax(1)
        row = self._row(result, picks, analysis)
        row["round_s"] = round(time.perf_counter() - t0, 1)
        rf = f", RF {row['rf_miou']:.3f}" if "rf_miou" in row else ""
        log.info(
            "seed %d %s: %d patches, mIoU %.3f%s (%.0f s)", self.seed, self.arm, row["patches"], row["miou"], rf,
            row["round_s"],
        )  # fmt: skip
        return row, result, self.probs

    def _order(self, need: int, unused: np.ndarray) -> tuple:
        """The unused patches in the order this arm would annotate them, and (suggest) how good that order is."""
        from .suggest import suggest

        st = self.setup
        if self.arm == "random":
            return list(self.rng.permutation(unused)), {}
        res = suggest(
            st.image,
            None if self.labels is None else self.labels.labels,  # the previous round's labels
            self.model,
            k=max(need, 5) + 3,  # spares, should the annotator decline one
            size=int((st.pool[:, 3] - st.pool[:, 1]).max()),
            seed=int(self.rng.integers(1 << 31)),
            device=str(st.device),
            probabilities=None if self.probs is None else self.probs.__getitem__,
            candidates=st.pool[unused],
            novelty=self.arm == "suggest-novel",
            explore=0.5 if self.arm == "suggest-mix" else 0.0,
        )
        index = {tuple(st.pool[i]): i for i in unused}
        order = [index[c.box()] for c in res.suggestions]
        if self.pred is None:
            return order, {}
        cand = np.array([c.box() for c in res.candidates])
        top = np.array([c.box() for c in res.suggestions[:5]])
        return order, {
            "analysis_model_patches": len(self.chosen),
            "top5_error": round(float(_window_error(self.pred, st.truth, top).mean()), 4),
            "mean_candidate_error": round(float(_window_error(self.pred, st.truth, cand).mean()), 4),
        }

    def _annotate(self, order: list, need: int) -> list:
        """Simulate the annotator on the first ``need`` patches of ``order`` that it can annotate."""
        from .annotations import class_of
        from .synthetic import simulate_annotations

        st, picks = self.setup, []
        for i in order:
            if len(picks) == need:
                break
            z, y0, x0, y1, x1 = st.pool[i]
            new = simulate_annotations(
                st.truth[z], [(y0, x0, y1, x1)], st.classes, self.ann_rng, slice_position=int(z) + 1
            )
            # Training needs two classes: a patch that would leave only one is declined (a
            # person would outline another), which can only happen in the first round.
            if len(picks) == need - 1 and len({class_of(x.name) for x in self.shapes + new}) < 2:
                self.declined.add(int(i))
                continue
            self.shapes += new
            picks.append(int(i))
        if len(picks) < need:
            raise UserError(f"{self.arm} found only {len(picks)} of {need} patches with two classes to annotate")
        return picks

    def _row(self, result, picks: list, analysis: dict) -> dict:
        """The round's table row: its score on the held-out pixels (and the forest's, for the peer arm)."""
        st, n_classes = self.setup, len(self.setup.classes)
        last = self.model.last_round
        row = {
            "seed": self.seed,
            "arm": self.arm,
            "patches": len(self.chosen),
            "annotated_pixels": int((self.labels.labels >= 0).sum()),
            "miou": round(miou(self.pred[st.test_mask], st.truth[st.test_mask], n_classes), 4),
            "train_iterations": last["iterations"],
            "train_s": last["duration_s"],
            "stop_reason": result.stop_reason,
            "new_patches": [st.pool[i].tolist() for i in picks],
            **analysis,
        }
        if self.peer is not None:
            planes = np.nonzero(st.test_mask.any((1, 2)))[0]
            clf = self.peer.fit(self.labels.labels)
            got = np.concatenate([self.peer.predict(clf, int(z), st.test_mask[z]) for z in planes])
            want = np.concatenate([st.truth[z][st.test_mask[z]] for z in planes])
            row["rf_miou"] = round(miou(got, want, n_classes), 4)
        return row


def _title(row: dict) -> str:
    return f"{row['arm']}, seed {row['seed']}: {row['patches']} patches, mIoU {row['miou']:.3f}"


def area_under_curve(patches: Sequence[float], scores: Sequence[float]) -> float:
    """Mean score over the patch-count range (trapezoids over patches, divided by the range)."""
    patches, scores = np.asarray(patches, float), np.asarray(scores, float)
    if len(patches) < 2:
        return float(scores.mean())
    return float(np.sum((scores[1:] + scores[:-1]) / 2 * np.diff(patches)) / (patches[-1] - patches[0]))


def summarize(rows: list, schedule: Sequence[int], arms: Sequence[str]) -> dict:
    """Per arm: mean and spread of mIoU per round over seeds, area under the curve, the RF line.

    ``patches_to_rf_final``: the first patch count at which the arm's mean curve reaches the RF
    peer's mean score at the last round (None if never).
    """
    out = {}
    rf_rows = [r for r in rows if "rf_miou" in r]
    rf_curve = None
    if rf_rows:
        rf_curve = [float(np.mean([r["rf_miou"] for r in rf_rows if r["patches"] == p])) for p in schedule]
    for arm in arms:
        curve, spread, aucs = [], [], []
        for p in schedule:
            v = [r["miou"] for r in rows if r["arm"] == arm and r["patches"] == p]
            curve.append(float(np.mean(v)))
            spread.append(float(np.std(v)))
        for seed in sorted({r["seed"] for r in rows}):
            mine = sorted((r["patches"], r["miou"]) for r in rows if r["arm"] == arm and r["seed"] == seed)
            aucs.append(area_under_curve(*zip(*mine)))
        entry = {
            "patches": list(schedule),
            "miou_mean": [round(c, 4) for c in curve],
            "miou_std": [round(c, 4) for c in spread],
            "auc_mean": round(float(np.mean(aucs)), 4),
            "auc_per_seed": [round(a, 4) for a in aucs],
        }
        errors = [(r["top5_error"], r["mean_candidate_error"]) for r in rows if r["arm"] == arm and "top5_error" in r]
        if errors:
            entry["top5_error_ratio_by_round"] = [round(a / max(b, 1e-9), 3) for a, b in errors]
        if rf_curve is not None:
            reach = [p for p, c in zip(schedule, curve) if c >= rf_curve[-1]]
            entry["patches_to_rf_final"] = reach[0] if reach else None
        out[arm] = entry
    if rf_curve is not None:
        out["rf"] = {"patches": list(schedule), "miou_mean": [round(c, 4) for c in rf_curve]}
    return out


def montage(
    image: np.ndarray,
    probs: np.ndarray,
    pool: np.ndarray,
    train_p: list[list[int]],
    val_p: list[list[int]],
    test_mask: np.ndarray,
    title: str = "",
    max_side: int = 2048,
) -> np.ndarray:
    """Probability map of the last class per pool plane, patches outlined, planes tiled, as RGB.

    Training patches are red, validation patches blue, unused pool patches green; held-out (scored)
    pixels are darkened.
    """
    from .figures import BLUE, GREEN, RED, outline, probability_rgb

    planes = sorted({int(z) for z in pool[:, 0]})[:16]
    tiles = []
    for z in planes:
        rgb = probability_rgb(probs[z, -1]).astype(np.float32)
        rgb[test_mask[z]] *= 0.55
        rgb = rgb.astype(np.uint8)
        used = {tuple(p) for p in train_p} | {tuple(p) for p in val_p}
        for p in pool[pool[:, 0] == z]:
            if tuple(p.tolist()) not in used:
                outline(rgb, p[1], p[2], p[3], p[4], GREEN, 2)
        for color, group in ((RED, train_p), (BLUE, val_p)):
            for p in group:
                if p[0] == z:
                    outline(rgb, p[1], p[2], p[3], p[4], color, 4)
        tiles.append(rgb)
    cols = int(np.ceil(np.sqrt(len(tiles))))
    rows = int(np.ceil(len(tiles) / cols))
    h, w = tiles[0].shape[:2]
    gap = 6
    sheet = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        sheet[gap + r * (h + gap) : gap + r * (h + gap) + h, gap + c * (w + gap) : gap + c * (w + gap) + w] = t
    step = int(np.ceil(max(sheet.shape[:2]) / max_side))
    sheet = sheet[::step, ::step]
    return _with_title(sheet, title)


def _with_title(rgb: np.ndarray, title: str) -> np.ndarray:
    if not title:
        return rgb
    from PIL import Image, ImageDraw

    band = Image.new("RGB", (rgb.shape[1], 24), (255, 255, 255))
    ImageDraw.Draw(band).text((6, 6), title, fill=(0, 0, 0))
    return np.concatenate([np.asarray(band), rgb], axis=0)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    import imageio.v3 as iio

    iio.imwrite(path, rgb)


def _write_gif(path: Path, frames: list) -> None:
    from PIL import Image

    h = max(f.shape[0] for f in frames)
    w = max(f.shape[1] for f in frames)
    images = [
        Image.fromarray(np.pad(f, ((0, h - f.shape[0]), (0, w - f.shape[1]), (0, 0)), constant_values=255))
        for f in frames
    ]
    images[0].save(path, save_all=True, append_images=images[1:], duration=1200, loop=0)


def plot_learning_curves(result: dict, path: Path, title: str = "") -> None:
    """Plot mIoU vs annotated patches and vs annotated pixels: each arm (mean ± sd over seeds) and the RF peer."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UserError("the learning-curve figure needs matplotlib: pip install 'tem-ij-plugin[experiment]'") from exc
    rows = result["rows"]
    schedule = result["schedule"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"random": "tab:gray", "suggest": "tab:red", "rf": "tab:blue"}
    for arm in result["arms"]:
        s = result["summary"][arm]
        m, sd = np.array(s["miou_mean"]), np.array(s["miou_std"])
        label = f"{arm} (AUC {s['auc_mean']:.3f})"
        axes[0].plot(schedule, m, "o-", color=colors.get(arm), label=label)
        axes[0].fill_between(schedule, m - sd, m + sd, color=colors.get(arm), alpha=0.15)
        px = [np.mean([r["annotated_pixels"] for r in rows if r["arm"] == arm and r["patches"] == p]) for p in schedule]
        axes[1].plot(px, m, "o-", color=colors.get(arm), label=arm)
    if "rf" in result["summary"]:
        rf = result["summary"]["rf"]["miou_mean"]
        peer_arm = "random" if "random" in result["arms"] else result["arms"][0]
        px = [
            np.mean([r["annotated_pixels"] for r in rows if r["arm"] == peer_arm and r["patches"] == p])
            for p in schedule
        ]
        axes[0].plot(schedule, rf, "s--", color=colors["rf"], label=f"random forest ({peer_arm} labels)")
        axes[1].plot(px, rf, "s--", color=colors["rf"], label="random forest")
    axes[0].set_xlabel("annotated patches")
    axes[1].set_xlabel("annotated pixels")
    for ax in axes:
        ax.set_ylabel("mIoU on held-out pixels")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    n = len(result["seeds"])
    fig.suptitle(title or f"learning curves ({n} seed{'s' if n > 1 else ''}, mean ± sd)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_tables(result: dict, out_dir: Path) -> list:
    """``experiment.json`` (everything) and ``experiment.csv`` (one row per seed, arm and round)."""
    json_path, csv_path = out_dir / "experiment.json", out_dir / "experiment.csv"
    json_path.write_text(json.dumps(result, indent=1), encoding="utf-8")
    keys = list(dict.fromkeys(k for r in result["rows"] for k in r if k != "new_patches"))
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result["rows"])
    return [json_path, csv_path]

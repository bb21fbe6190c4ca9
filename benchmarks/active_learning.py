"""Does `suggest` beat random patch choice? Simulated annotation rounds on real ssTEM (ISBI 2012).

The three tasks of ``label_gap.py``: membrane vs interior, large profiles vs rest, and background /
membrane / mitochondria. The pool is the 256x256 grid of sections 0-14 (60 patches); sections 15-29
are held out and scored (every second pixel in y and x, the same pixels for every method). Per seed,
each arm (``random``, ``suggest``) runs the schedule of annotated patch counts with a simulated
partial-polygon annotator; every round retrains from the previous round's model (warm start, and a
round that does not beat the previous model keeps it) for a fixed number of iterations: 360, about
90 s of the 2-core CPU (see ``rounds.py``), iterations rather than minutes so that a busy machine
changes the time, not the result. The random-forest peer learns from the random arm's labels in the
same rounds.

Reports, per task: area under the learning curve (mean over seeds), the patch count at which `suggest`
first reaches the RF peer's 15-patch score, the largest drop of a round below the best earlier round,
and the ratio of the true error of the top-5 suggestions to the average candidate's for the model
trained on 4 patches. Rows are written after every round (``TASK/TASK.partial.json``), so a stopped
run keeps what it measured. ``--speed`` instead times scoring every candidate of a synthetic 3840x2920
image.

    python benchmarks/active_learning.py                          # three tasks, seeds 0,1,2
    python benchmarks/active_learning.py --tasks mito --seeds 0 --schedule 1,2,4
    python benchmarks/active_learning.py --speed
    python benchmarks/active_learning.py --tasks profiles --arms suggest-novel,suggest-mix --out /tmp/al/variants
    python benchmarks/active_learning.py --report /tmp/al/s0 /tmp/al/s1 --json results/active_learning_90s.json

``--report`` combines the rows that runs (one per seed, say) kept in their ``--out`` folders: seeds
with every round of both arms go into the summary, the rest are listed as incomplete.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from isbi_partial import DATA, load  # noqa: E402
from label_gap import CLASSES, truths  # noqa: E402


def run_task(task, images, truth, args, out_dir):
    from tem_ij_plugin.config import Settings
    from tem_ij_plugin.experiment import plot_learning_curves, run_experiment, summarize
    from tem_ij_plugin.suggest import candidate_boxes

    pool = candidate_boxes((15,) + images.shape[1:], 256)
    test_mask = np.zeros(images.shape, bool)
    test_mask[15:, :: args.score_stride, :: args.score_stride] = True
    settings = Settings()
    settings.train.max_iterations = args.iterations
    settings.train.min_iterations = args.iterations // 2
    settings.train.max_minutes = 30
    rows = []

    def keep(ev):
        rows.append(ev["row"])
        partial = {"classes": CLASSES[task], "rows": rows, "seeds": args.seeds}
        (out_dir / f"{task}.partial.json").write_text(json.dumps(partial, indent=1))

    for seed in args.seeds:
        run_experiment(
            images,
            truth,
            CLASSES[task],
            pool,
            test_mask,
            settings,
            schedule=args.schedule,
            seeds=[seed],
            arms=args.arms,
            rf="random" in args.arms,
            device="cpu",
            out_dir=out_dir if seed == args.seeds[0] else None,
            progress=keep,
        )
    result = {
        "classes": CLASSES[task],
        "schedule": sorted(args.schedule),
        "seeds": args.seeds,
        "arms": args.arms,
        "rows": rows,
    }
    result["summary"] = summarize(rows, result["schedule"], result["arms"])
    plot_learning_curves(
        result,
        out_dir / f"learning_curves_{task}.png",
        title=f"ISBI 2012 {task}: {len(args.seeds)} seeds, {args.iterations} iterations per round",
    )
    return result


def combine_runs(folders: list, tasks: list, schedule: list) -> dict:
    """Summaries of the complete seeds in the runs' ``TASK/TASK.partial.json`` files."""
    from tem_ij_plugin.experiment import KNOWN_ARMS, summarize

    out = {}
    for task in tasks:
        rows = []
        for folder in folders:
            path = Path(folder) / task / f"{task}.partial.json"
            if path.is_file():
                rows += json.loads(path.read_text())["rows"]
        seeds = sorted({r["seed"] for r in rows})
        arms = [a for a in KNOWN_ARMS if any(r["arm"] == a for r in rows)]
        complete = [s for s in seeds if sum(r["seed"] == s for r in rows) == len(arms) * len(schedule)]
        rows = [r for r in rows if r["seed"] in complete]
        if not rows:
            continue
        result = {"rows": rows}
        out[task] = {
            "seeds": complete,
            "incomplete_seeds": [s for s in seeds if s not in complete],
            "summary": summarize(rows, schedule, arms),
            "top5_error_ratio_at_4_patches": four_patch_ratio(result),
            "worst_drop_below_best_earlier_round": worst_drops(result),
            "rows": rows,
        }
    return out


def worst_drops(result):
    """Per arm and seed: how far the worst round fell below the best earlier round (0 when none fell)."""
    out = {}
    for r in result["rows"]:
        out.setdefault(r["arm"], {}).setdefault(r["seed"], []).append(r["miou"])
    return {
        arm: {seed: round(max([0.0] + [max(c[:i]) - c[i] for i in range(1, len(c))]), 4) for seed, c in curves.items()}
        for arm, curves in out.items()
    }


def four_patch_ratio(result, arm="suggest"):
    """Top-5 error / mean candidate error of the model trained on 4 patches (a suggest arm), per seed."""
    out = []
    for r in result["rows"]:
        if r["arm"] == arm and r.get("analysis_model_patches") == 4:
            out.append(round(r["top5_error"] / max(r["mean_candidate_error"], 1e-9), 3))
    return out


def headline(summary, result) -> str:
    """One line per task: each arm's AUC per seed and mean curve, the forest line, the 4-patch ratios."""
    parts = []
    for arm, sm in summary.items():
        line = f"{arm}: AUC {sm.get('auc_per_seed')} curve {sm['miou_mean']}"
        if sm.get("patches_to_rf_final") is not None:
            line += f", reaches RF@15 at {sm['patches_to_rf_final']}"
        parts.append(line)
    ratios = {a: four_patch_ratio(result, a) for a in summary if a.startswith("suggest")}
    return "; ".join(parts) + f"; top-5 ratio at 4 patches {ratios}; worst drops {worst_drops(result)}"


def speed(args):
    """Time suggest() on every candidate of a synthetic 3840x2920 image with a default-architecture model.

    Twice: computing the probabilities itself, and reusing a map computed before (``--probabilities``).
    """
    import torch

    from tem_ij_plugin.annotations import rasterize
    from tem_ij_plugin.config import Settings
    from tem_ij_plugin.suggest import suggest
    from tem_ij_plugin.synthetic import SYNTHETIC_CLASSES, make_tem_image, simulate_annotations
    from tem_ij_plugin.train import train

    small, small_truth = make_tem_image(768, 768, seed=1)
    rng = np.random.default_rng(0)
    boxes = [(0, 0, 256, 256), (256, 256, 512, 512), (512, 0, 768, 256), (0, 512, 256, 768)]
    labels = rasterize(simulate_annotations(small_truth, boxes, SYNTHETIC_CLASSES, rng), (1, 768, 768))
    s = Settings()
    s.train.max_iterations = 60
    model = train(small[None], labels, s, device="cpu").model
    big, big_truth = make_tem_image(2920, 3840, seed=7)
    big_labels = rasterize(
        simulate_annotations(big_truth, [(0, 0, 256, 256), (1024, 1024, 1280, 1280)], SYNTHETIC_CLASSES, rng),
        (1, 2920, 3840),
    ).labels
    from tem_ij_plugin.predict import predict_stack

    def timed(probabilities=None):
        times = []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            res = suggest(big[None], big_labels, model, k=5, seed=i, device="cpu", probabilities=probabilities)
            times.append(time.perf_counter() - t0)
            print(f"  run {i + 1}: {times[-1]:.1f} s, {len(res.candidates)} candidates, {res.timings}", flush=True)
        return times, res

    times, res = timed()
    # The map the user already has from `tem-ij predict` (--probabilities): its cost is not counted.
    probs = predict_stack(model.net, big[None], model.normalization, torch.device("cpu"))
    reuse, res_reuse = timed(probs.__getitem__)
    return {
        "image": [2920, 3840],
        "candidates": len(res.candidates),
        "seconds": [round(t, 2) for t in times],
        "median_s": round(float(np.median(times)), 2),
        "stages_last_run_s": {k: round(v, 2) for k, v in res.timings.items()},
        "reusing_probabilities_s": [round(t, 2) for t in reuse],
        "reusing_probabilities_median_s": round(float(np.median(reuse)), 2),
        "reusing_stages_last_run_s": {k: round(v, 2) for k, v in res_reuse.timings.items()},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--tasks", default="membrane,profiles,mito")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--schedule", default="1,2,4,8,15")
    ap.add_argument(
        "--arms",
        default="random,suggest",
        help="random, suggest, suggest-novel and/or suggest-mix (default: %(default)s)",
    )
    ap.add_argument("--iterations", type=int, default=360, help="training iterations per round (360: about 90 s)")
    ap.add_argument("--score-stride", type=int, default=2)
    ap.add_argument("--speed", action="store_true", help="time scoring a 3840x2920 image instead")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "active_learning")
    ap.add_argument("--report", nargs="+", type=Path, metavar="DIR", help="combine the rows kept in --out folders")
    ap.add_argument("--json", type=Path, help="with --report: where to write the combined summary")
    args = ap.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.schedule = [int(s) for s in args.schedule.split(",")]
    args.arms = args.arms.split(",")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("tem_ij_plugin.train",):
        logging.getLogger(name).setLevel(logging.WARNING)
    sys.path.insert(0, str(ROOT))
    if args.report:
        res = combine_runs(args.report, args.tasks.split(","), args.schedule)
        for task, r in res.items():
            print(f"{task} (seeds {r['seeds']}): {headline(r['summary'], r)}")
        if args.json:
            args.json.write_text(json.dumps({"iterations_per_round": args.iterations, "tasks": res}, indent=1))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if args.speed:
        res = speed(args)
        print(f"scoring every candidate of 3840x2920: median {res['median_s']} s")
        print(f"reusing the probability map: median {res['reusing_probabilities_median_s']} s")
        (args.out / "speed.json").write_text(json.dumps(res, indent=1))
        return 0
    if not (args.data / "images").is_dir():
        print(f"SKIP: ISBI 2012 data not found at {args.data}")
        return 0
    images = load(args.data)[0]
    dense = {task: t.astype(np.int64) for task, t in truths(args.data, images.shape).items()}
    report = {"iterations_per_round": args.iterations, "score_stride": args.score_stride, "tasks": {}}
    for task in args.tasks.split(","):
        t0 = time.perf_counter()
        out_dir = args.out / task
        out_dir.mkdir(exist_ok=True)
        result = run_task(task, images, dense[task], args, out_dir)
        s = result["summary"]
        report["tasks"][task] = {
            "summary": s,
            "top5_error_ratio_at_4_patches": four_patch_ratio(result),
            "worst_drop_below_best_earlier_round": worst_drops(result),
            "minutes": round((time.perf_counter() - t0) / 60, 1),
            "rows": result["rows"],
        }
        (args.out / "active_learning.json").write_text(json.dumps(report, indent=1))
        print(f"\n{task}: {headline(s, result)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

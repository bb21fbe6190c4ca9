import threading

import numpy as np
import pytest
import torch
from conftest import tiny_settings

from tem_ij_plugin.annotations import rasterize
from tem_ij_plugin.errors import ModelFileError, UserError
from tem_ij_plugin.metrics import mean_iou
from tem_ij_plugin.modelio import FORMAT_VERSION, load_model, read_metadata, save_model
from tem_ij_plugin.patches import Patch, annotated_patches, default_validation_count, round_history, split
from tem_ij_plugin.predict import predict_stack
from tem_ij_plugin.train import _expanded_box, train


@pytest.fixture(scope="module")
def trained(synthetic):
    image, _, shapes = synthetic
    labels = rasterize(shapes, (1,) + image.shape)
    events = []
    res = train(image[None], labels, tiny_settings(12), device="cpu", progress=events.append)
    return image, labels, res, events


def test_training_events_carry_exactly_the_keys_of_their_contract(trained):
    from tem_ij_plugin.events import TrainEvent

    assert {frozenset(ev) for ev in trained[3]} == {frozenset(TrainEvent.__annotations__)}


def test_train_returns_best_model_with_history(trained):
    image, labels, res, events = trained
    rnd = res.model.meta["history"]["rounds"][-1]
    assert res.stop_reason == "max iterations"
    assert rnd["iterations"] == 12
    assert len(res.val_patches) == 1
    assert len(res.train_patches) == 3
    assert rnd["curves"]["val_iteration"] == [4, 8, 12]
    assert rnd["best_iteration"] in (4, 8, 12)
    assert 0 <= rnd["best_score"] <= 1
    assert res.model.meta["annotations_sha256"] == labels.digest()
    assert res.model.classes == ["background", "cell"]
    assert [e["iteration"] for e in events] == list(range(1, 13))
    assert events[-1]["best_score"] is not None


def test_train_does_not_modify_inputs(synthetic):
    image, _, shapes = synthetic
    labels = rasterize(shapes, (1,) + image.shape)
    img_copy, lab_copy = image.copy(), labels.labels.copy()
    train(image[None], labels, tiny_settings(2), device="cpu")
    assert np.array_equal(image, img_copy)
    assert np.array_equal(labels.labels, lab_copy)


def test_same_seed_same_model(synthetic):
    image, _, shapes = synthetic
    labels = rasterize(shapes, (1,) + image.shape)
    a = train(image[None], labels, tiny_settings(6), device="cpu").model.net.state_dict()
    b = train(image[None], labels, tiny_settings(6), device="cpu").model.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cancel_leaves_valid_model(synthetic):
    image, _, shapes = synthetic
    labels = rasterize(shapes, (1,) + image.shape)
    cancel = threading.Event()

    def progress(ev):
        if ev["iteration"] == 3:
            cancel.set()

    res = train(image[None], labels, tiny_settings(100), device="cpu", progress=progress, cancel=cancel)
    assert res.stop_reason == "cancelled"
    assert res.model.meta["history"]["rounds"][-1]["iterations"] == 3
    probs = predict_stack(res.model.net, image[None], res.model.normalization, torch.device("cpu"))
    assert probs.shape == (1, 2) + image.shape
    assert np.allclose(probs.sum(1), 1, atol=1e-4)


def test_backtracking_and_early_stopping(synthetic):
    image, _, shapes = synthetic
    labels = rasterize(shapes, (1,) + image.shape)
    s = tiny_settings(400)
    s.train.eval_every = 1
    s.train.patience = 1
    s.train.backtracks = 2
    s.train.smoothing = 0.0
    res = train(image[None], labels, s, device="cpu")
    rnd = res.model.meta["history"]["rounds"][-1]
    assert res.stop_reason == "early stopping"
    assert rnd["backtracks"] == 2
    assert rnd["iterations"] < 400


def test_warm_start_continues_history_and_checks_classes(trained, synthetic):
    image, labels, res, _ = trained
    res2 = train(image[None], labels, tiny_settings(2), init=res.model, device="cpu")
    assert len(res2.model.meta["history"]["rounds"]) == 2
    other = rasterize(synthetic[2], (1,) + image.shape, classes=["background", "cell", "mito"])
    with pytest.raises(UserError, match="starting model has classes background, cell"):
        train(image[None], other, tiny_settings(2), init=res.model, device="cpu")


def test_missing_device_is_an_error(trained):
    image, labels, _, _ = trained
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(UserError, match="CUDA is not available"):
        train(image[None], labels, tiny_settings(1), device="cuda")


def test_model_file_round_trip(tmp_path, trained):
    image, _, res, _ = trained
    p = tmp_path / "m.model"
    save_model(p, res.model)
    m = load_model(p)
    assert m.classes == res.model.classes
    assert m.meta["format_version"] == FORMAT_VERSION
    sd1, sd2 = res.model.net.state_dict(), m.net.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert "torch" in m.meta["versions"]
    assert m.meta["history"]["rounds"][0]["curves"]["train_loss"]


def test_bad_model_files(tmp_path, trained):
    from safetensors.torch import save_file

    _, _, res, _ = trained
    good = tmp_path / "good.model"
    save_model(good, res.model)
    data = good.read_bytes()
    (tmp_path / "trunc.model").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        load_model(tmp_path / "trunc.model")
    (tmp_path / "short.model").write_bytes(b"abc")
    with pytest.raises(ModelFileError, match="too short"):
        load_model(tmp_path / "short.model")
    (tmp_path / "random.model").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(ModelFileError, match="not a tem_ij_plugin model"):
        load_model(tmp_path / "random.model")
    save_file({"w": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ModelFileError, match="not a tem_ij_plugin model"):
        load_model(tmp_path / "foreign.safetensors")
    newer = tmp_path / "newer.model"
    res.model.meta["format_version"] = FORMAT_VERSION + 1
    try:
        from tem_ij_plugin import modelio

        state = {k: v.contiguous() for k, v in res.model.net.state_dict().items()}
        meta = dict(res.model.meta, format=modelio.FORMAT)
        save_file(state, str(newer), metadata={"tem_ij_plugin": __import__("json").dumps(meta)})
    finally:
        res.model.meta.pop("format_version")
    with pytest.raises(ModelFileError, match="newer tem_ij_plugin"):
        read_metadata(newer)


def test_split_keeps_classes_and_holds_out():
    labels = np.full((1, 512, 512), -1, np.int16)
    labels[0, :10, :10] = 0
    labels[0, :10, 300:310] = 1
    labels[0, 300:310, :10] = 0
    labels[0, 300:310, 300:310] = 1
    labels[0, 310:320, 300:310] = 0
    patches = annotated_patches(labels, 256)
    assert len(patches) == 4
    train_p, val_p = split(labels, patches, 1, 0, 2)
    assert len(val_p) == 1, "the only two-class patch validates"
    assert val_p[0].grid_index == (0, 256, 256), "the only two-class patch validates"
    with pytest.raises(UserError, match="only 4 patch"):
        split(labels, patches, 4, 0, 2)


@pytest.mark.parametrize("n, expected", [(2, 0), (4, 0), (7, 0), (8, 2), (15, 3)])
def test_default_validation_starts_at_two_held_out_patches(n, expected):
    assert default_validation_count(n) == expected


def test_a_default_training_on_four_patches_trains_on_all_of_them(synthetic):
    image, _, shapes = synthetic
    labels = rasterize(shapes, (1,) + image.shape)
    res = train(image[None], labels, tiny_settings(2, validation_patches=None), device="cpu")
    assert (len(res.train_patches), len(res.val_patches)) == (4, 0)


def test_training_crops_never_reach_validation_patches():
    p = Patch(0, 256, 256, 512, 512)
    val = [Patch(0, 0, 256, 256, 512), Patch(0, 256, 0, 512, 256), Patch(0, 0, 0, 256, 256)]
    y0, x0, y1, x1 = _expanded_box(p, 32, (1, 1024, 1024), val)
    assert not any(v.overlaps(0, y0, x0, y1, x1) for v in val)
    assert (y1, x1) == (544, 544)
    assert y0 == 256
    assert x0 == 256


def test_mean_iou():
    conf = np.array([[8, 2], [0, 10]])
    assert mean_iou(conf) == pytest.approx((8 / 10 + 10 / 12) / 2)


def test_image_smaller_than_one_patch_trains_and_predicts(synthetic):
    image, _, shapes = synthetic
    small = image[:90, :100]
    labels = rasterize(
        [s for s in shapes if s.polygons[0].max(0)[0] < 100 and s.polygons[0].max(0)[1] < 90], (1,) + small.shape
    )
    res = train(small[None], labels, tiny_settings(3, validation_patches=None), device="cpu")
    assert res.val_patches == []
    assert len(res.train_patches) == 1
    probs = predict_stack(res.model.net, small[None], res.model.normalization, torch.device("cpu"), tile=256)
    assert probs.shape == (1, 2, 90, 100)


def test_cancel_before_first_step_still_gives_a_scored_model(synthetic):
    image, _, shapes = synthetic
    labels = rasterize(shapes, (1,) + image.shape)
    cancel = threading.Event()
    cancel.set()
    res = train(image[None], labels, tiny_settings(10), device="cpu", cancel=cancel)
    rnd = res.model.meta["history"]["rounds"][-1]
    assert res.stop_reason == "cancelled"
    assert rnd["iterations"] == 0
    assert rnd["best_score"] is not None
    assert rnd["curves"]["val_iteration"] == [0]


def test_no_best_model_from_the_warm_up(synthetic):
    image, _, shapes = synthetic
    labels = rasterize(shapes, (1,) + image.shape)
    s = tiny_settings(12)
    s.train.min_iterations = 8
    rnd = train(image[None], labels, s, device="cpu").model.meta["history"]["rounds"][-1]
    assert rnd["curves"]["val_iteration"] == [4, 8, 12]
    assert rnd["best_iteration"] in (8, 12)


# -- warm-started rounds ----------------------------------------------------------------------------
def _four_patch_labels():
    labels = np.full((1, 512, 512), -1, np.int16)
    for y, x in ((0, 0), (0, 256), (256, 0), (256, 256)):
        labels[0, y : y + 10, x : x + 10] = 0
        labels[0, y + 20 : y + 30, x : x + 10] = 1
    return labels


def test_split_keeps_earlier_validation_patches():
    labels = _four_patch_labels()
    patches = annotated_patches(labels, 256)
    for seed in range(5):
        _, val_p = split(labels, patches, None, seed, 2, keep_val=[[0, 0, 256, 256, 512]])
        assert [p.as_list() for p in val_p] == [[0, 0, 256, 256, 512]]


def test_split_by_default_keeps_an_earlier_validation_patch_below_its_minimum():
    labels = _four_patch_labels()
    _, val_p = split(labels, annotated_patches(labels, 256), None, 0, 2, keep_val=[[0, 0, 0, 256, 256]])
    assert [p.as_list() for p in val_p] == [[0, 0, 0, 256, 256]]


def test_split_holds_out_nothing_when_asked_for_none():
    labels = _four_patch_labels()
    _, val_p = split(labels, annotated_patches(labels, 256), 0, 0, 2, keep_val=[[0, 0, 0, 256, 256]])
    assert val_p == []


def test_split_grows_validation_to_hold_every_earlier_patch():
    labels = _four_patch_labels()
    earlier = [[0, 0, 0, 256, 256], [0, 256, 256, 512, 512]]
    _, val_p = split(labels, annotated_patches(labels, 256), None, 0, 2, keep_val=earlier)
    assert sorted(p.as_list() for p in val_p) == earlier


def test_a_warm_start_that_is_not_beaten_is_kept(trained):
    image, labels, res, _ = trained
    cancel = threading.Event()
    cancel.set()
    res2 = train(image[None], labels, tiny_settings(4), init=res.model, device="cpu", cancel=cancel)
    assert res2.model.meta["history"]["rounds"][-1]["kept_previous_model"] is True


def test_a_kept_warm_start_has_the_previous_weights(trained):
    image, labels, res, _ = trained
    cancel = threading.Event()
    cancel.set()
    res2 = train(image[None], labels, tiny_settings(4), init=res.model, device="cpu", cancel=cancel)
    before, after = res.model.net.state_dict(), res2.model.net.state_dict()
    # Equal up to the rounding of the prior correction, which is removed and estimated again.
    assert all(torch.allclose(before[k].cpu().double(), after[k].cpu().double(), atol=1e-4) for k in before)


def test_a_warm_start_is_validated_on_the_earlier_held_out_patches(trained):
    image, labels, res, _ = trained
    earlier = res.model.meta["history"]["rounds"][-1]["val_patches"]
    patches = annotated_patches(labels.labels, 128)
    # A seed whose own split would hold out another patch.
    seed = next(k for k in range(1, 50) if [p.as_list() for p in split(labels.labels, patches, 1, k, 2)[1]] != earlier)
    s = tiny_settings(2)
    s.train.seed = seed
    res2 = train(image[None], labels, s, init=res.model, device="cpu")
    assert res2.model.meta["history"]["rounds"][-1]["val_patches"] == earlier


def test_a_warm_start_resumes_from_the_uncorrected_network(trained):
    from tem_ij_plugin.train import Trainer

    image, labels, _, _ = trained
    s = tiny_settings(4)
    s.model.steps, s.train.prior_correction = 1, "em"
    first = train(image[None], labels, s, device="cpu").model
    shift = first.meta["history"]["rounds"][-1]["prior_correction"]["logit_shift"]
    warm = Trainer(image[None], labels, s, init=first, device="cpu")
    corrected = first.net.unet.out.bias.detach()
    assert torch.allclose(warm.net.unet.out.bias.detach().cpu(), corrected - torch.tensor(shift), atol=1e-6)


def test_the_summary_says_when_the_starting_model_was_kept(trained):
    image, labels, res, _ = trained
    cancel = threading.Event()
    cancel.set()
    res2 = train(image[None], labels, tiny_settings(4), init=res.model, device="cpu", cancel=cancel)
    assert "kept the starting model" in res2.summary()


def test_the_summary_of_a_new_model_keeps_nothing(trained):
    assert "kept" not in trained[2].summary()


def test_split_holds_out_a_patch_no_earlier_round_trained_on():
    labels = _four_patch_labels()
    patches = annotated_patches(labels, 256)
    trained = [[0, 0, 0, 256, 256], [0, 0, 256, 256, 512], [0, 256, 0, 512, 256]]
    for seed in range(5):
        _, val_p = split(labels, patches, 1, seed, 2, trained=trained)
        assert [p.as_list() for p in val_p] == [[0, 256, 256, 512, 512]]


def test_a_warm_start_is_not_judged_on_patches_it_trained_on(trained):
    from tem_ij_plugin.train import Trainer

    image, labels, _, _ = trained
    s = tiny_settings(4)
    s.train.validation_patches = 0  # the first round trains on every patch
    first = train(image[None], labels, s, device="cpu").model
    s.train.validation_patches = 1
    assert Trainer(image[None], labels, s, init=first, device="cpu").start_score is None


def _final_only(iterations: int):
    s = tiny_settings(iterations)
    s.train.warm_selection = "final"
    s.train.patience, s.train.backtracks = 1, 0  # judged checkpoints would stop at the first that is no better
    return s


@pytest.fixture(scope="module")
def final_only_round(trained):
    image, labels, res, _ = trained
    return train(image[None], labels, _final_only(12), init=res.model, device="cpu")


def test_a_final_only_round_runs_its_whole_budget(final_only_round):
    assert final_only_round.model.meta["history"]["rounds"][-1]["iterations"] == 12


def _kept_if_better(rnd: dict) -> int:
    """The iteration a final-only round must keep: its end when that scored above its start, else 0."""
    score = rnd["curves"]["smoothed_score"]
    return rnd["curves"]["val_iteration"][-1] if score[-1] > score[0] + 1e-4 else 0


def test_a_final_only_round_keeps_its_end_when_it_beats_the_start(final_only_round):
    rnd = final_only_round.model.last_round
    assert rnd["best_iteration"] == _kept_if_better(rnd)


def test_a_final_only_round_lets_its_end_compete_between_validations(trained):
    image, labels, res, _ = trained
    # 10 iterations, validations every 4: the end (10) is validated after the loop.
    rnd = train(image[None], labels, _final_only(10), init=res.model, device="cpu").model.last_round
    assert rnd["best_iteration"] == _kept_if_better(rnd)


def test_a_fresh_training_ignores_final_only(trained):
    from tem_ij_plugin.train import Trainer

    image, labels, _, _ = trained
    assert Trainer(image[None], labels, _final_only(4), device="cpu").final_only is False


@pytest.fixture()
def final_trainer(trained):
    """A final-only warm start, scored on its validation patch, before its first step."""
    from tem_ij_plugin.train import Trainer

    image, labels, res, _ = trained
    return Trainer(image[None], labels, _final_only(12), init=res.model, device="cpu")


def _scored(trainer, iteration: int, above_start: float):
    """Put the trainer at ``iteration`` with a smoothed score ``above_start`` above its start's."""
    trainer.it, trainer.smoothed = iteration, trainer.start_score + above_start
    return trainer


def test_a_final_only_checkpoint_before_the_end_does_not_compete(final_trainer):
    _scored(final_trainer, 200, 0.5)._consider(final=False)
    assert final_trainer.best["iteration"] == 0


def test_a_final_only_end_that_scores_higher_is_kept(final_trainer):
    _scored(final_trainer, 200, 0.5)._consider(final=True)
    assert final_trainer.best["iteration"] == 200


def test_a_final_only_end_that_scores_lower_leaves_the_start(final_trainer):
    _scored(final_trainer, 200, -0.5)._consider(final=True)
    assert final_trainer.best["iteration"] == 0


def test_a_final_only_end_competes_inside_the_warm_up(final_trainer):
    final_trainer.tc.min_iterations = 150
    _scored(final_trainer, 20, 0.5)._consider(final=True)
    assert final_trainer.best["iteration"] == 20


def test_a_final_only_round_never_stalls(final_trainer):
    for it in range(200, 200 + 25 * (final_trainer.tc.patience + 2), 25):
        _scored(final_trainer, it, -0.5)._consider(final=False)
    assert not final_trainer.stalled()


# -- refit on every patch (train.refit) -------------------------------------------------------------
def _refit_settings(refit: float = 0.5):
    s = tiny_settings(12)
    s.train.refit = refit
    return s


@pytest.fixture(scope="module")
def refitted(synthetic):
    image, _, shapes = synthetic
    labels = rasterize(shapes, (1,) + image.shape)
    events = []
    res = train(image[None], labels, _refit_settings(), device="cpu", progress=events.append)
    return image, labels, res, events


def test_refit_runs_its_fraction_of_the_selected_length(refitted):
    rnd = refitted[2].model.meta["history"]["rounds"][-1]
    assert rnd["refit"]["iterations"] == round(0.5 * rnd["best_iteration"])


def test_refit_learns_the_validation_patches(refitted):
    rnd = refitted[2].model.meta["history"]["rounds"][-1]
    assert rnd["refit"]["patches"] == rnd["val_patches"]


def test_refit_steps_are_reported_as_their_own_stage(refitted):
    rnd = refitted[2].model.meta["history"]["rounds"][-1]
    assert sum(ev["stage"] == "refit" for ev in refitted[3]) == rnd["refit"]["iterations"]


def test_refit_changes_the_selected_model(refitted, trained):
    # Same seed and settings up to the refit: `trained` is the selected model without it.
    a, b = trained[2].model.net.state_dict(), refitted[2].model.net.state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_refit_keeps_the_selection_score(refitted, trained):
    a, b = (r[2].model.meta["history"]["rounds"][-1] for r in (trained, refitted))
    assert b["best_score"] == a["best_score"]


@pytest.fixture(scope="module")
def cancelled_refit(trained):
    """The `trained` run with a refit that is cancelled at its first step."""
    image, labels, _, _ = trained
    cancel = threading.Event()

    def progress(ev):
        if ev["stage"] == "refit":
            cancel.set()

    return train(image[None], labels, _refit_settings(), device="cpu", progress=progress, cancel=cancel)


def test_cancelled_refit_keeps_the_selected_model(cancelled_refit, trained):
    a, b = trained[2].model.net.state_dict(), cancelled_refit.model.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cancelled_refit_is_not_recorded(cancelled_refit):
    assert "refit" not in cancelled_refit.model.meta["history"]["rounds"][-1]


def test_no_refit_without_validation_patches(synthetic):
    image, _, shapes = synthetic
    s = _refit_settings()
    s.train.validation_patches = 0
    res = train(image[None], rasterize(shapes, (1,) + image.shape), s, device="cpu")
    assert "refit" not in res.model.meta["history"]["rounds"][-1]


def test_a_warm_start_from_a_refit_does_not_compete_on_patches_it_learnt(refitted):
    image, labels, res, _ = refitted
    rnd = train(image[None], labels, tiny_settings(4), init=res.model, device="cpu").model.meta["history"]["rounds"][-1]
    assert rnd["curves"]["val_iteration"][0] != 0


@pytest.fixture(scope="module")
def refit_then_new_patch(synthetic):
    """A refit on three patches, then a warm-started round with the fourth annotated too."""
    image, _, shapes = synthetic
    labels = rasterize(shapes, (1,) + image.shape)
    three = labels.labels.copy()
    three[0, 128:, 128:] = -1  # the fourth patch is annotated in the second round only
    first = train(image[None], type(labels)(labels=three, classes=labels.classes), _refit_settings(), device="cpu")
    return train(image[None], labels, tiny_settings(4), init=first.model, device="cpu")


def test_after_a_refit_a_warm_start_is_validated_on_a_new_patch(refit_then_new_patch):
    assert [p.as_list() for p in refit_then_new_patch.val_patches] == [[0, 128, 128, 256, 256]]


def test_after_a_refit_a_warm_start_competes_on_the_new_patch(refit_then_new_patch):
    rnd = refit_then_new_patch.model.meta["history"]["rounds"][-1]
    assert rnd["curves"]["val_iteration"][0] == 0


def test_a_model_never_trained_here_has_no_rounds():
    from tem_ij_plugin.modelio import TrainedModel

    assert TrainedModel(net=None, meta={"classes": ["a", "b"]}).last_round == {}


def test_last_round_is_the_latest_history_record(trained):
    res = trained[2]
    assert res.model.last_round is res.model.meta["history"]["rounds"][-1]


def test_round_history_keeps_unseen_validation_patches_held_out():
    rounds = [{"train_patches": [[0, 0, 0, 1, 1]], "val_patches": [[0, 1, 1, 2, 2]]}]
    assert round_history(rounds)[0] == [[0, 1, 1, 2, 2]]


def test_round_history_counts_refitted_validation_patches_as_learnt():
    rounds = [
        {"train_patches": [[0, 0, 0, 1, 1]], "val_patches": [[0, 1, 1, 2, 2]], "refit": {"patches": [[0, 1, 1, 2, 2]]}}
    ]
    assert round_history(rounds) == ([], {(0, 0, 0, 1, 1), (0, 1, 1, 2, 2)})

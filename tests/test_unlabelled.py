"""The terms that learn from unlabelled pixels, the class-prior correction and test-time augmentation."""

import numpy as np
import pytest
import torch
from conftest import tiny_settings

from tem_ij_plugin.annotations import boundary_band, rasterize
from tem_ij_plugin.backends import TTA_MODES, TorchBackend, TTABackend, _dihedral
from tem_ij_plugin.errors import UserError
from tem_ij_plugin.losses import edge_potts_loss, pseudo_label_loss
from tem_ij_plugin.nn import RecurrentUNet
from tem_ij_plugin.predict import make_predictor
from tem_ij_plugin.priors import (
    MIN_PRIOR,
    effective_training_prior,
    em_priors,
    estimate_correction,
    labelled_reference,
    logit_shift,
    shift_output_bias,
)


@pytest.fixture(scope="module")
def with_terms(synthetic):
    """A tiny training with the edge and pseudo-label terms and the EM prior correction all on."""
    from tem_ij_plugin.train import Trainer

    image, _, shapes = synthetic
    s = tiny_settings(8)
    s.model.steps = 1
    s.train.edge_weight, s.train.pseudo_weight, s.train.prior_correction = 0.5, 0.5, "em"
    s.train.band_weight, s.train.selection = 0.5, "band"
    trainer = Trainer(image[None], rasterize(shapes, (1,) + image.shape), s, device="cpu")
    return trainer, trainer.run()


@pytest.fixture(scope="module")
def trained(with_terms):
    return with_terms[1].model


def _step_image(edge: int = 16, size: int = 32) -> torch.Tensor:
    """(1, 1, size, size): dark left of column ``edge``, bright right of it."""
    img = torch.zeros(1, 1, size, size)
    img[..., edge:] = 1.0
    return img


def _step_probs(edge: int, size: int = 32) -> torch.Tensor:
    """(1, 2, size, size): class 0 left of ``edge``, class 1 right of it (confident, not one-hot)."""
    p1 = torch.full((1, 1, size, size), 0.05)
    p1[..., edge:] = 0.95
    return torch.cat([1 - p1, p1], dim=1)


# -- the boundary band ------------------------------------------------------------------------------
def _two_outlines(gap: int = 4):
    """Class 0 on columns 0-9, class 1 from column 10 + gap; unlabelled in between and below row 20."""
    lab = np.full((30, 30), -1, np.int16)
    lab[:20, :10] = 0
    lab[:20, 10 + gap :] = 1
    return lab


def test_band_gives_the_gap_the_nearer_class():
    band = boundary_band(_two_outlines(4), 2, width=6)
    assert band[5, 10:14].tolist() == [0, 0, 1, 1]


def test_band_leaves_labelled_pixels_out():
    lab = _two_outlines(4)
    assert (boundary_band(lab, 2, width=6)[lab >= 0] == -1).all()


def test_band_leaves_pixels_far_from_a_second_class_out():
    assert (boundary_band(_two_outlines(4), 2, width=6)[27, :] == -1).all()


def test_no_band_between_distant_outlines():
    assert (boundary_band(_two_outlines(14), 2, width=6) == -1).all()


# -- edge-aware Potts term ------------------------------------------------------------------------
def test_edge_term_prefers_a_boundary_on_the_image_edge():
    image = _step_image(16)
    assert edge_potts_loss(_step_probs(16), image) < edge_potts_loss(_step_probs(22), image)


def test_edge_term_charges_nothing_for_one_confident_class():
    probs = torch.zeros(2, 3, 24, 24)
    probs[:, 1] = 1.0
    assert float(edge_potts_loss(probs, torch.rand(2, 1, 24, 24))) == pytest.approx(0.0, abs=1e-7)


def test_edge_term_reaches_unlabelled_pixels():
    logits = torch.randn(1, 2, 32, 32, requires_grad=True)
    edge_potts_loss(torch.softmax(logits, 1), _step_image(16)).backward()
    assert torch.count_nonzero(logits.grad) > 0


def test_edge_term_is_mirror_symmetric():
    probs, image = _step_probs(12), torch.rand(1, 1, 32, 32)
    mirrored = edge_potts_loss(probs.flip(-1), image.flip(-1))
    assert float(mirrored) == pytest.approx(float(edge_potts_loss(probs, image)), rel=1e-5)


# -- pseudo-labels ----------------------------------------------------------------------------------
def _pseudo_case():
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 8, 8, requires_grad=True)
    teacher = torch.full((1, 2, 8, 8), 0.5)
    teacher[:, 1, :, :4] = 0.97  # confident on the left half
    teacher[:, 0, :, :4] = 0.03
    labels = torch.full((1, 8, 8), -1)
    labels[0, :2] = 0  # the top two rows are labelled
    return logits, teacher, labels


def test_pseudo_labels_leave_labelled_pixels_alone():
    logits, teacher, labels = _pseudo_case()
    pseudo_label_loss(logits, teacher, labels, threshold=0.9).backward()
    assert torch.count_nonzero(logits.grad[0, :, :2]) == 0


def test_pseudo_labels_skip_unconfident_pixels():
    logits, teacher, labels = _pseudo_case()
    pseudo_label_loss(logits, teacher, labels, threshold=0.9).backward()
    assert torch.count_nonzero(logits.grad[0, :, 2:, 4:]) == 0


def test_pseudo_labels_teach_confident_unlabelled_pixels():
    logits, teacher, labels = _pseudo_case()
    pseudo_label_loss(logits, teacher, labels, threshold=0.9).backward()
    # The teacher says class 1: descending the loss raises class 1's logit there.
    assert bool((logits.grad[0, 1, 2:, :4] < 0).all())


def test_no_confident_pixel_means_no_pseudo_loss():
    logits, teacher, labels = _pseudo_case()
    assert float(pseudo_label_loss(logits, teacher, labels, threshold=0.99).detach()) == 0.0


# -- class priors (Saerens EM) ----------------------------------------------------------------------
def _calibrated_posteriors(train_prior, test_prior, n=40000, seed=0):
    """Posteriors of a 1-D Gaussian classifier calibrated to ``train_prior``, on data drawn with ``test_prior``."""
    rng = np.random.default_rng(seed)
    means = np.arange(len(train_prior)) * 2.0
    cls = rng.choice(len(test_prior), size=n, p=test_prior)
    x = rng.normal(means[cls], 1.0)
    lik = np.exp(-0.5 * (x[:, None] - means[None]) ** 2)
    post = lik * np.asarray(train_prior)[None]
    return post / post.sum(1, keepdims=True)


def test_em_recovers_the_priors_of_shifted_data():
    train, test = np.array([1 / 3, 1 / 3, 1 / 3]), np.array([0.7, 0.25, 0.05])
    prior, _ = em_priors(_calibrated_posteriors(train, test), train)
    assert np.abs(prior - test).max() < 0.02


def test_em_keeps_the_priors_of_unshifted_data():
    train = np.array([0.5, 0.3, 0.2])
    prior, _ = em_priors(_calibrated_posteriors(train, train), train)
    assert np.abs(prior - train).max() < 0.02


def test_one_em_step_is_the_mean_posterior():
    train = np.array([0.5, 0.5])
    probs = _calibrated_posteriors(train, [0.8, 0.2])
    prior, iterations = em_priors(probs, train, max_iter=1)
    assert iterations == 1
    assert np.allclose(prior, probs.mean(0), atol=1e-9)


def test_priors_never_reach_zero():
    probs = np.tile([[1.0, 0.0]], (100, 1))
    prior, _ = em_priors(probs, [0.5, 0.5])
    assert prior.min() >= MIN_PRIOR * 0.99


def test_logit_shift_applies_bayes_rule():
    train, new = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.2, 0.6])
    logits = np.array([0.3, -1.0, 0.8])
    shifted = np.exp(logits + logit_shift(new, train))
    bayes = np.exp(logits) / np.exp(logits).sum() * new / train
    assert np.allclose(shifted / shifted.sum(), bayes / bayes.sum())


def test_effective_training_prior_weighs_counts():
    assert np.allclose(effective_training_prior([300, 100], [1.0, 3.0]), [0.5, 0.5])


@pytest.mark.parametrize("steps", [1, 2])
def test_output_bias_shift_moves_every_logit_by_the_shift(steps):
    torch.manual_seed(0)
    net = RecurrentUNet(1, 3, depth=2, base_channels=4, steps=steps).eval()
    x = torch.randn(1, 1, 16, 16)
    before = net(x)
    shift = np.array([0.5, -1.0, 2.0])
    shift_output_bias(net, shift)
    if steps == 1:
        assert torch.allclose(net(x) - before, torch.tensor(shift, dtype=torch.float32)[None, :, None, None], atol=1e-5)
    else:
        assert not torch.allclose(net(x), before)


def test_estimate_correction_on_a_network():
    torch.manual_seed(0)
    net = RecurrentUNet(1, 2, depth=2, base_channels=4, steps=1).eval()
    image = np.random.default_rng(0).random((2, 64, 64)).astype(np.float32)
    rec = estimate_correction(net, image, lambda a: a, [0.5, 0.5], torch.device("cpu"), n_crops=3)
    assert sum(rec["image_prior"]) == pytest.approx(1.0, abs=1e-4)
    assert rec["em_iterations"] >= 1


# -- class priors against the network's own reference ----------------------------------------------
def test_labelled_reference_of_a_perfect_network_is_the_labelled_mix():
    from tem_ij_plugin.patches import Patch

    labels = np.full((1, 8, 8), -1, np.int16)
    labels[0, :2] = 0
    labels[0, 6:] = 1

    def perfect(a):  # posteriors that are the labels themselves (class 0 where a < 0.5)
        return np.stack([a < 0.5, a >= 0.5]).astype(np.float32)

    image = (labels == 1).astype(np.float32)
    ref = labelled_reference(perfect, image, lambda a: a, labels, [Patch(0, 0, 0, 8, 8)], [0.3, 0.7])
    assert np.allclose(ref, [0.3, 0.7])


def test_labelled_reference_shows_a_networks_bias():
    from tem_ij_plugin.patches import Patch

    labels = np.zeros((1, 8, 8), np.int16)
    labels[0, 4:] = 1

    def timid(_a):  # 0.8 / 0.2 everywhere, whatever the class
        return np.stack([np.full((8, 8), 0.8), np.full((8, 8), 0.2)]).astype(np.float32)

    ref = labelled_reference(
        timid, np.zeros((1, 8, 8), np.float32), lambda a: a, labels, [Patch(0, 0, 0, 8, 8)], [0.5, 0.5]
    )
    assert np.allclose(ref, [0.8, 0.2])


@pytest.fixture(scope="module")
def relative(synthetic):
    """A tiny training with the default class-prior correction, and its trainer."""
    from tem_ij_plugin.train import Trainer

    image, _, shapes = synthetic
    s = tiny_settings(8)
    trainer = Trainer(image[None], rasterize(shapes, (1,) + image.shape), s, device="cpu")
    return trainer, trainer.run().model


def test_relative_is_the_default_correction():
    from tem_ij_plugin.config import Settings

    assert Settings().train.prior_correction == "relative"


def test_the_default_correction_records_a_reference(relative):
    record = relative[1].last_round["prior_correction"]
    assert sum(record["reference"]) == pytest.approx(1.0, abs=1e-4)


def test_the_default_correction_keeps_the_labelled_mix_on_record(relative):
    trainer, model = relative
    record = model.last_round["prior_correction"]
    assert np.allclose(record["train_prior"], trainer.training_prior(), atol=1e-5)


def test_the_default_shift_is_measured_against_the_reference(relative):
    record = relative[1].last_round["prior_correction"]
    expected = logit_shift(record["image_prior"], record["reference"])
    assert np.allclose(record["logit_shift"], expected, atol=1e-4)


def test_the_default_shift_is_in_the_saved_output_bias(relative, tmp_path):
    from tem_ij_plugin.modelio import load_model, save_model

    trainer, model = relative
    save_model(tmp_path / "m.model", model)
    saved = load_model(tmp_path / "m.model").net.unet.out.bias.detach()
    shift = torch.tensor(model.last_round["prior_correction"]["logit_shift"])
    assert torch.allclose(saved - trainer.best["state"]["unet.out.bias"], shift, atol=1e-5)


# -- test-time augmentation -------------------------------------------------------------------------
@pytest.mark.parametrize("k", range(8))
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_dihedral_inverse_undoes_the_transform(k, kind):
    a = np.arange(2 * 3 * 5 * 5, dtype=np.float32).reshape(2, 3, 5, 5)
    x = torch.from_numpy(a) if kind == "torch" else a
    back = _dihedral(_dihedral(x, k), k, inverse=True)
    assert np.array_equal(np.asarray(back), a)


def test_the_eight_transforms_differ():
    a = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    assert len({_dihedral(a, k).tobytes() for k in range(8)}) == 8


class _Columns:
    """A backend that is not flip-equivariant: 'probability' of class 1 is the column position."""

    name, precision, on_device = "test", "fp32", False

    def __call__(self, x):
        ramp = np.linspace(0, 1, x.shape[-1], dtype=np.float32)[None, None, None, :]
        p1 = np.broadcast_to(ramp, x.shape).copy()
        return np.concatenate([1 - p1, p1], axis=1)


@pytest.mark.parametrize("mode", ["flips", "dihedral"])
def test_tta_averages_over_the_symmetries(mode):
    out = TTABackend(_Columns(), mode)(np.zeros((1, 1, 6, 6), np.float32))
    # A column ramp averaged with its mirror image is flat: 0.5 everywhere.
    assert np.allclose(out, 0.5)


def test_tta_of_a_trained_network_is_a_probability_map(trained):
    net = trained.net
    pred = make_predictor(net, torch.device("cpu"), backend="torch", tile=64, overlap=16, tta="flips")
    probs = pred.plane(np.random.default_rng(0).random((80, 96)).astype(np.float32))
    assert probs.shape == (net.n_classes, 80, 96)
    assert np.allclose(probs.sum(0), 1.0, atol=1e-4)


def test_tta_off_is_the_plain_backend(trained):
    pred = make_predictor(trained.net, torch.device("cpu"), backend="torch", tile=64, overlap=16, tta="off")
    assert isinstance(pred.backend, TorchBackend)


def test_unknown_tta_mode_is_a_user_error(trained):
    with pytest.raises(UserError, match="test-time augmentation"):
        make_predictor(trained.net, torch.device("cpu"), tta="rotate")


def test_tta_modes_name_their_cost():
    assert TTA_MODES == {"off": 1, "flips": 4, "dihedral": 8}


# -- the trainer with the terms on ------------------------------------------------------------------
def test_trainer_records_its_loss_terms(with_terms):
    rnd = with_terms[1].model.meta["history"]["rounds"][-1]
    assert rnd["loss_terms"] == {"supervised": 1.0, "band": 0.5, "edge": 0.5, "pseudo": 0.5}


def test_trainer_selects_on_the_band_score_when_told(with_terms):
    curves = with_terms[1].model.meta["history"]["rounds"][-1]["curves"]
    assert curves["val_score"] == curves["val_band"]


def test_trainer_records_both_validation_scores(with_terms):
    curves = with_terms[1].model.meta["history"]["rounds"][-1]["curves"]
    assert len(curves["val_labelled"]) == len(curves["val_iteration"])


def test_band_pixels_reach_the_band_term(with_terms):
    trainer = with_terms[0]
    band = torch.cat([trainer.batch().band for _ in range(4)])
    assert int((band >= 0).sum()) > 0


def test_trainer_records_the_prior_correction(with_terms):
    rnd = with_terms[1].model.meta["history"]["rounds"][-1]
    assert rnd["prior_correction"]["method"] == "em"


def test_prior_correction_is_in_the_saved_output_bias(with_terms, tmp_path):
    from tem_ij_plugin.modelio import load_model, save_model

    trainer, res = with_terms
    shift = res.model.meta["history"]["rounds"][-1]["prior_correction"]["logit_shift"]
    plain = trainer.best["state"]["unet.out.bias"]
    save_model(tmp_path / "m.safetensors", res.model)
    saved = load_model(tmp_path / "m.safetensors").net.unet.out.bias.detach()
    assert torch.allclose(saved - plain, torch.tensor(shift), atol=1e-5)


def test_pseudo_term_waits_for_the_warm_up(synthetic):
    from tem_ij_plugin.train import Trainer

    image, _, shapes = synthetic
    s = tiny_settings(4)
    s.train.pseudo_weight, s.train.min_iterations, s.train.band_weight = 1.0, 100, 0.0
    trainer = Trainer(image[None], rasterize(shapes, (1,) + image.shape), s, device="cpu")
    batch = trainer.batch()
    outs = trainer.net(batch.x, all_steps=True)
    assert torch.equal(trainer.loss(outs, batch), trainer.terms["supervised"][1](outs, batch, trainer))


# -- selection criteria ----------------------------------------------------------------------------
def _confusions(band_right: bool):
    """Labelled pixels all right; band pixels all right or all wrong (truth x prediction)."""
    labelled = np.array([[50, 0], [0, 50]])
    band = np.array([[10, 0], [0, 10]]) if band_right else np.array([[0, 10], [10, 0]])
    return labelled, band


def test_labelled_criterion_ignores_the_band():
    from tem_ij_plugin.train import labelled_criterion

    assert labelled_criterion(*_confusions(False)) == labelled_criterion(*_confusions(True))


def test_band_criterion_penalises_errors_in_the_band():
    from tem_ij_plugin.train import band_criterion

    assert band_criterion(*_confusions(False)) < band_criterion(*_confusions(True))


def test_every_selection_setting_has_a_criterion():
    from typing import get_args

    from tem_ij_plugin.config import TrainConfig
    from tem_ij_plugin.train import SELECTION

    assert set(get_args(TrainConfig.model_fields["selection"].annotation)) == set(SELECTION)

import numpy as np
import pytest
import torch

from tem_ij_plugin.augment import Augmenter
from tem_ij_plugin.tiling import blend_window, pad_amounts, stitch, tile_specs


@pytest.mark.parametrize("shape, tile, overlap", [((100, 130), 32, 8), ((64, 64), 64, 0), ((70, 257), 48, 47)])
def test_tile_stitch_round_trip_is_exact(shape, tile, overlap):
    from tem_ij_plugin.tiling import tile_window

    rng = np.random.default_rng(0)
    img = rng.random((2,) + shape).astype(np.float32)
    acc = np.zeros_like(img)
    wsum = np.zeros(shape, np.float32)
    specs = tile_specs(*shape, tile, overlap)
    for t in specs:
        window = tile_window(t, *shape, overlap)
        stitch(acc, wsum, t, img[:, t.y0 : t.y0 + t.height, t.x0 : t.x0 + t.width], window)
    # float32 sums of weights from 1e-12 to 1 (up to 48 tiles deep in the last case) round at ~1e-5
    assert np.allclose(acc / wsum, img, atol=2e-5)
    assert all(t.y0 + t.height <= shape[0] and t.x0 + t.width <= shape[1] for t in specs)


def test_tiles_are_fitted_to_the_image():
    # 2928 rows (2920 padded to the default model's multiple, 16) need 4 tiles of at most 960 that overlap
    # by 240, and 912 rows (912 = ceil((2928 + 3 * 240) / 4), a multiple of 16) are enough for 4
    specs = tile_specs(2928, 3840, 960, 240, multiple=16)
    assert {(t.height, t.width) for t in specs} == {(912, 960)}
    assert len(specs) == 20


@pytest.mark.parametrize("length, multiple", [(2928, 16), (2920, 8), (1008, 16), (4000, 32)])
def test_fitted_tiles_start_on_the_networks_pooling_grid(length, multiple):
    specs = tile_specs(length, 64, 512, 96, multiple=multiple)
    assert all(t.y0 % multiple == 0 and t.height % multiple == 0 for t in specs)


@pytest.mark.parametrize("multiple", [1, 16])
def test_fitted_tiles_overlap_by_at_least_the_overlap_and_cover_the_image(multiple):
    for length in (304, 976, 2928, 3856, 5008):
        specs = tile_specs(length, 64, 960, 240, multiple=multiple)
        starts = sorted({t.y0 for t in specs})
        size = specs[0].height
        assert starts[0] == 0
        assert starts[-1] + size == length
        assert all(b - a <= size - 240 for a, b in zip(starts, starts[1:])), length


def test_an_axis_shorter_than_a_tile_is_one_tile_of_its_length():
    specs = tile_specs(96, 2016, 512, 64, multiple=32)
    assert {t.height for t in specs} == {96}


def test_window_positive_with_halo_and_ramp():
    w = blend_window(64, 16)[32]  # a row through the centre
    assert w.min() > 0
    assert w[32] == 1
    assert np.all(w[:6] <= 1e-6), "the halo (3/8 of the overlap) gets no weight"
    assert np.all(w[-6:] <= 1e-6), "the halo (3/8 of the overlap) gets no weight"
    assert np.all(np.diff(w[:16]) >= 0)
    assert 0 < w[7] < 1
    assert w[10] == 1


def test_blended_pixels_come_from_tile_interiors():
    # Where two tiles overlap, every pixel is weighted by a tile in which it lies at least a halo from the edge.
    tile, overlap = 64, 24
    halo = int(3 / 8 * overlap)
    w = blend_window(tile, overlap)[tile // 2]
    step = tile - overlap
    for p in range(step, tile):  # the overlap of tiles [0, 64) and [40, 104)
        wa, wb = w[p], w[p - step]
        da, db = tile - 1 - p, p - step  # distance to the nearer (inner) edge of each tile
        assert wa / (wa + wb) < 1e-5 or da >= halo
        assert wb / (wa + wb) < 1e-5 or db >= halo


def test_window_of_a_tile_narrower_than_its_blending_zones_weights_its_centre():
    w = blend_window(256, 240)[128]  # halo 90, ramp 60: the two sides meet in the middle
    assert np.all(w[:90] <= 1e-6)
    assert np.all(w[-90:] <= 1e-6)
    assert np.argmax(w) in (127, 128)
    assert np.allclose(w, w[::-1])


def test_overlap_for_halo():
    from tem_ij_plugin.tiling import overlap_for_halo

    for halo in (0, 5, 34, 40):
        ov = overlap_for_halo(halo)
        assert ov % 8 == 0
        assert int(3 / 8 * ov) >= halo
        assert int(3 / 8 * (ov - 8)) < halo


def test_pad_amounts():
    assert pad_amounts(100, 300, 256, 8) == (156, 4)


def test_tiling_an_image_that_is_not_a_multiple_of_the_network_is_refused():
    with pytest.raises(ValueError):
        tile_specs(100, 96, 64, 0, multiple=32)


def test_geometry_keeps_image_and_labels_aligned():
    # Labels derived from the image: after augmentation the label must still match the image.
    g = torch.Generator().manual_seed(1)
    yy, xx = torch.meshgrid(torch.arange(120), torch.arange(120), indexing="ij")
    img = ((((yy // 15) + (xx // 15)) % 2).float())[None, None].repeat(4, 1, 1, 1)
    lab = img[:, 0].long()
    lab[:, :, :30] = -1
    aug = Augmenter(64, elastic_alpha=4, rotation_deg=30, scale=0.2)
    out_img, out_lab = aug.geometry(img, lab, g)
    assert out_img.shape == (4, 1, 64, 64)
    assert out_lab.shape == (4, 64, 64)
    known = out_lab >= 0
    crisp = (out_img[:, 0] < 0.1) | (out_img[:, 0] > 0.9)
    agree = (out_lab[known & crisp] == (out_img[:, 0][known & crisp] > 0.5).long()).float().mean()
    assert agree > 0.99
    assert set(out_lab.unique().tolist()) <= {-1, 0, 1}
    assert (out_lab == -1).any()


def test_augmentation_is_seeded():
    x = torch.rand(3, 1, 100, 100)
    y = torch.randint(-1, 2, (3, 100, 100))
    aug = Augmenter(48)
    a = aug(x, y, torch.Generator().manual_seed(5))
    b = aug(x, y, torch.Generator().manual_seed(5))
    c = aug(x, y, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_input_size_covers_rotation_and_zoom():
    aug = Augmenter(192, scale=0.15, elastic_alpha=6)
    assert aug.input_size() >= 192 * 1.414 * 1.15


def test_normalization_ignores_nan_and_constant_images():
    from tem_ij_plugin.normalization import normalization_range, normalize

    a = np.linspace(0, 100, 10001, dtype=np.float32).reshape(1, 1, -1)
    a[0, 0, :50] = np.nan
    lo, hi = normalization_range(a)
    assert np.isfinite([lo, hi]).all()
    assert hi > lo
    assert np.isfinite(normalize(a, lo, hi)).all()
    assert normalization_range(np.full((4, 4), 7.0)) == (7.0, 8.0)

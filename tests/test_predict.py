"""Prediction engine: plane reader, plane writers, seams, backends, precision, resume and bad input."""

import json
import os
import platform
import resource
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import run_cli, sha256

from tem_ij_plugin import runtime
from tem_ij_plugin.apply import PredictJob
from tem_ij_plugin.backends import onnx_available
from tem_ij_plugin.errors import Cancelled, UserError
from tem_ij_plugin.io import Calibration, PlaneReader
from tem_ij_plugin.modelio import TrainedModel, build_network, save_model
from tem_ij_plugin.normalization import DEFAULT_NORMALIZATION
from tem_ij_plugin.predict import default_tiling, make_predictor
from tem_ij_plugin.receptive import effective_receptive_field, fold_batchnorm
from tem_ij_plugin.runtime import available_memory, release_freed_memory, reuse_freed_memory
from tem_ij_plugin.stackio import Layout, TiffPlaneWriter, ZarrPlaneWriter


def random_net(norm="batch", depth=3, base=8, in_channels=1, seed=0):
    """An untrained network with non-trivial BatchNorm statistics (as after training)."""
    torch.manual_seed(seed)
    arch = {"n_classes": 2, "depth": depth, "base_channels": base, "steps": 1, "norm": norm, "in_channels": in_channels}
    net = build_network(arch)
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return net.eval(), arch


def save_random_model(path, meta=None, **kw):
    net, arch = random_net(**kw)
    meta = {
        "classes": ["background", "cell"], "architecture": arch, "normalization": dict(DEFAULT_NORMALIZATION),
        **(meta or {}),
    }  # fmt: skip
    save_model(path, TrainedModel(net, meta))
    return path


run = run_cli


@pytest.fixture()
def stack(tmp_path, synthetic):
    """A 3-plane ImageJ stack with calibration and slice labels."""
    image = synthetic[0]
    data = np.stack([image, np.roll(image, 40, axis=1), image[::-1]])
    path = tmp_path / "stack.tif"
    tifffile.imwrite(
        path,
        data,
        imagej=True,
        resolution=(200.0, 200.0),
        metadata={"axes": "ZYX", "unit": "\\u00B5m", "spacing": 0.05, "Labels": ["s1", "s2", "s3"]},
    )
    return path, data


# --- reading planes -------------------------------------------------------------------------------------------


def test_plane_reader_reads_contiguous_stacks_plane_by_plane(stack):
    path, data = stack
    with PlaneReader(path) as r:
        assert (r.n_planes, r.plane_shape, r.stack_axes) == (3, (256, 256), "Z")
        assert r._offset is not None, "an uncompressed ImageJ stack is read with positioned reads"
        assert all(np.array_equal(r.read(i), data[i]) for i in (2, 0, 1))
        assert r.slice_labels == ["s1", "s2", "s3"]
        assert r.calibration.unit == "µm"
        assert r.calibration.pixel_width == pytest.approx(0.005)


def test_plane_reader_hyperstack_channel_and_order(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (2, 3, 2, 16, 20), dtype=np.uint8)  # T Z C Y X
    path = tmp_path / "h.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "TZCYX"})
    with pytest.raises(UserError, match="2 channels.*--channel 1..2"):
        PlaneReader(path)
    with pytest.raises(UserError, match="out of range"):
        PlaneReader(path, channel=3)
    with PlaneReader(path, channel=2) as r:
        assert (r.stack_axes, r.stack_shape, r.n_planes) == ("TZ", (2, 3), 6)
        # Z runs fastest, as in ImageJ's stack order.
        assert all(np.array_equal(r.read(t * 3 + z), data[t, z, 1]) for t in range(2) for z in range(3))


def test_plane_reader_compressed_pages_and_bigtiff(tmp_path):
    data = np.random.default_rng(1).random((4, 12, 10)).astype(np.float32)
    tifffile.imwrite(tmp_path / "c.tif", data, compression="zlib", photometric="minisblack")
    tifffile.imwrite(tmp_path / "b.tif", data, bigtiff=True, photometric="minisblack")
    for name in ("c.tif", "b.tif"):
        with PlaneReader(tmp_path / name) as r:
            assert r.n_planes == 4
            assert all(np.array_equal(r.read(i), data[i]) for i in range(4))


# --- writing planes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["o.tif", "o.btf", "o.zarr"])
def test_every_output_format_has_a_plane_writer(tmp_path, name):
    from tem_ij_plugin.stackio import PlaneWriter, open_writer

    lay = Layout("Z", (2,), 2, (8, 9), np.dtype(np.float32))
    writer = open_writer(tmp_path / name, lay, Calibration(0.5, 0.5, "nm"))
    writer.close()
    assert isinstance(writer, PlaneWriter)


def test_tiff_writer_fills_a_hyperstack_plane_by_plane(tmp_path):
    data = np.random.default_rng(0).random((2, 3, 2, 8, 9)).astype(np.float32)  # T Z C Y X
    lay = Layout("TZ", (2, 3), 2, (8, 9), np.dtype(np.float32))
    w = TiffPlaneWriter(tmp_path / "o.tif", lay, Calibration(0.5, 0.5, "nm", 2.0), labels=["a", "b"] * 6)
    for i in (5, 0, 3, 1, 4, 2):  # any order
        w.write(i, data.reshape(6, 2, 8, 9)[i])
    assert not (tmp_path / "o.tif").exists()
    assert (tmp_path / "o.partial.tif").exists()
    w.finish()
    with tifffile.TiffFile(tmp_path / "o.tif") as tif:
        assert tif.series[0].axes == "TZCYX"
        assert np.array_equal(tif.series[0].asarray(), data)
        assert tif.imagej_metadata["Labels"][:2] == ["a", "b"]
        assert tif.imagej_metadata["unit"] == "nm"
    assert not (tmp_path / "o.partial.tif").exists()


def test_imagej_limit_suggests_bigtiff_or_zarr(tmp_path):
    lay = Layout("Z", (400,), 2, (2048, 2048), np.dtype(np.float32))
    with pytest.raises(UserError, match=r"4 GB.*o\.btf.*o\.zarr.*--dtype uint8"):
        TiffPlaneWriter(tmp_path / "o.tif", lay, Calibration())
    assert not list(tmp_path.iterdir()), "nothing is created when the output cannot hold the result"
    TiffPlaneWriter(tmp_path / "o.btf", lay, Calibration(), fmt="bigtiff").close()  # sparse, so cheap to create
    with tifffile.TiffFile(tmp_path / "o.partial.btf") as tif:
        assert tif.is_bigtiff
        assert tif.series[0].shape == (400, 2, 2048, 2048)


def test_zarr_writer_is_readable_ome_zarr(tmp_path):
    zarr = pytest.importorskip("zarr")
    data = np.random.default_rng(0).random((3, 2, 1100, 70)).astype(np.float32)  # Z C Y X, 2 chunks in Y
    lay = Layout("Z", (3,), 2, (1100, 70), np.dtype(np.float32))
    w = ZarrPlaneWriter(tmp_path / "o.zarr", lay, Calibration(0.004, 0.004, "µm", 0.05), ["background", "cell"])
    for i in range(3):
        w.write(i, data[i])
    w.finish()
    arr = zarr.open_array(str(tmp_path / "o.zarr" / "0"), mode="r")
    assert arr.shape == (2, 3, 1100, 70)  # OME-Zarr order: c, z, y, x
    assert np.array_equal(arr[:], data.transpose(1, 0, 2, 3))
    attrs = json.loads((tmp_path / "o.zarr" / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "z", "y", "x"]
    assert ms["axes"][-1]["unit"] == "micrometer"
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 0.05, 0.004, 0.004]
    assert [c["label"] for c in attrs["omero"]["channels"]] == ["background", "cell"]


# --- the network at inference ---------------------------------------------------------------------------------


def test_folding_batchnorm_keeps_outputs_and_the_original():
    net, _ = random_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(2, 1, 64, 64)
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert torch.allclose(folded(x), net(x), atol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items()), "the model is not modified"


def _seam_difference(norm, overlap=None):
    net, _ = random_net(norm=norm, depth=3, seed=2)
    image = np.random.default_rng(0).random((192, 192)).astype(np.float32)
    image[:, 96:] *= 0.3  # regions of different statistics, as in real sections
    dev = torch.device("cpu")
    whole = make_predictor(net, dev, backend="torch", tile=192, overlap=0).plane(image)
    tiled_pred = make_predictor(net, dev, backend="torch", tile=64, overlap=overlap)
    tiled = tiled_pred.plane(image)
    return float(np.abs(whole - tiled).max()), tiled_pred


GIB = 1 << 30
CPU = torch.device("cpu")


def test_cpu_tiles_grow_to_eight_overlaps_when_memory_allows():
    # The default depth-5 model: a 90 px receptive field radius asks for 256 px of overlap
    tile, overlap, batch = default_tiling(CPU, 90, 32, 16, available=64 * GIB)
    assert (tile, overlap, batch) == (2048, 256, 1)


def test_cpu_tiles_shrink_to_what_half_the_available_memory_holds():
    tile, _, _ = default_tiling(CPU, 90, 32, 16, available=4_000_000_000)
    assert tile == 1536  # 1536² px x 16 channels x 48 B = 1.81 GB; 1664 px would need 2.13 GB


def test_cpu_tiles_never_shrink_below_four_overlaps():
    assert default_tiling(CPU, 90, 32, 16, available=1)[0] == 1024


def test_cpu_tiles_stay_at_four_overlaps_when_the_free_memory_is_unknown():
    assert default_tiling(CPU, 90, 32, 16, available=None)[0] == 1024


def test_a_small_receptive_field_gets_1024_pixel_cpu_tiles():
    # depth 4: 35 px radius, 96 px overlap; 8 overlaps (768 px) ran slower than 1024 (README)
    assert default_tiling(CPU, 35, 16, 16, available=64 * GIB)[0] == 1024


def test_wider_networks_get_smaller_cpu_tiles_from_the_same_memory():
    assert default_tiling(CPU, 90, 32, 64, available=8 * GIB)[0] < default_tiling(CPU, 90, 32, 16, available=8 * GIB)[0]


def test_gpu_tiling_does_not_depend_on_host_memory():
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    assert default_tiling(cuda, 90, 32, 16, available=1) == default_tiling(cuda, 90, 32, 16, available=64 * GIB)


def test_a_resumed_runs_tile_is_kept_where_it_fits():
    assert default_tiling(CPU, 90, 32, 16, available=64 * GIB, prefer=1536)[0] == 1536


def test_a_resumed_runs_tile_that_no_longer_fits_gives_way_to_the_free_memory():
    assert default_tiling(CPU, 90, 32, 16, available=4_000_000_000, prefer=2048)[0] == 1536


@pytest.mark.parametrize("prefer", [4, 1000, 1 << 20])  # under 4 overlaps, off the network's grid, huge
def test_a_recorded_tile_the_default_could_not_be_is_ignored(prefer):
    assert default_tiling(CPU, 90, 32, 16, available=64 * GIB, prefer=prefer)[0] == 2048


def test_make_predictor_sizes_default_tiles_from_the_free_memory(monkeypatch):
    # The free memory of this machine cannot be changed by a test, so its reading is replaced.
    import tem_ij_plugin.predict as predict_module

    net, _ = random_net()
    monkeypatch.setattr(predict_module, "available_memory", lambda: 64 * GIB)
    roomy = make_predictor(net, CPU, backend="torch", halo=90)
    monkeypatch.setattr(predict_module, "available_memory", lambda: 1)
    tight = make_predictor(net, CPU, backend="torch", halo=90)
    assert (roomy.tile, tight.tile) == (max(1024, min(2048, 8 * roomy.overlap)), 4 * tight.overlap)


def test_an_explicit_tile_is_kept_whatever_the_memory(monkeypatch):
    import tem_ij_plugin.predict as predict_module

    monkeypatch.setattr(predict_module, "available_memory", lambda: 1)
    assert make_predictor(random_net()[0], CPU, backend="torch", tile=3072, halo=90).tile == 3072


def _meminfo(tmp_path, kib):
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       99999999 kB\nMemFree:         1000 kB\nMemAvailable:   {kib} kB\n")
    return path


def _cgroup(tmp_path, files):
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_available_memory_reads_memavailable(tmp_path):
    assert available_memory(_meminfo(tmp_path, 2048), tmp_path / "none") == 2048 * 1024


def test_available_memory_is_what_a_cgroup_v2_limit_leaves(tmp_path):
    root = _cgroup(tmp_path, {"memory.max": "1000000\n", "memory.current": "400000\n"})
    assert available_memory(_meminfo(tmp_path, 8 << 20), root) == 600000


def test_available_memory_ignores_a_cgroup_without_a_limit(tmp_path):
    root = _cgroup(tmp_path, {"memory.max": "max\n", "memory.current": "400000\n"})
    assert available_memory(_meminfo(tmp_path, 2048), root) == 2048 * 1024


def test_available_memory_ignores_cgroup_v1s_no_limit_number(tmp_path):
    v1 = {"memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": "5\n"}
    assert available_memory(_meminfo(tmp_path, 2048), _cgroup(tmp_path, v1)) == 2048 * 1024


def test_available_memory_survives_a_garbled_meminfo(tmp_path):
    path = tmp_path / "meminfo"
    path.write_bytes(b"MemAvailable: lots kB\n\xff\xfe")
    root = _cgroup(tmp_path, {"memory.max": "1000\n", "memory.current": "10\n"})
    assert available_memory(path, root) == 990


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="Linux only")
def test_available_memory_of_this_machine_is_positive():
    assert available_memory() > 0


def _small_pages_only() -> bool:
    """Whether large blocks fault in 4 KB pages here (transparent huge pages not forced on)."""
    try:
        return "[always]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return True


GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
glibc_pages = pytest.mark.skipif(not (GLIBC and _small_pages_only()), reason="counts glibc's page faults in 4 KB pages")


@pytest.fixture
def untuned_glibc(monkeypatch):
    """glibc as a process starts: none of the environment variables that make the block step aside."""
    for name in runtime._USER_TUNING:
        monkeypatch.delenv(name, raising=False)
    runtime._glibc.cache_clear()
    yield
    runtime._glibc.cache_clear()


def _faults_of_planes(pred, image, n=3) -> list:
    """Minor page faults of this process during each of ``n`` predictions of ``image``."""
    faults = []
    for _ in range(n):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        pred.plane(image)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults


def _large_map_predictor():
    """A predictor whose feature maps glibc maps afresh each time (64 MB each), warmed up, and its image."""
    net, _ = random_net(depth=2, base=16)  # 16 channels of a 1024-px fp32 tile
    pred = make_predictor(net, torch.device("cpu"), "torch", "fp32", tile=1024, overlap=64, batch_size=1, halo=8)
    image = np.random.default_rng(0).random((1024, 1024)).astype(np.float32)
    pred.plane(image)  # one-time costs (thread pools, kernels) out of the counts
    return pred, image


@glibc_pages
def test_planes_inside_one_block_reuse_the_first_planes_memory(untuned_glibc):
    pred, image = _large_map_predictor()
    with reuse_freed_memory():
        faults = _faults_of_planes(pred, image, n=4)
    # Without the block every plane faults in ~90 % of the first one's pages again. The best later plane,
    # not the third: CI once saw one 64 MB map (16384 pages) faulted afresh in one later plane.
    assert min(faults[1:]) < 0.5 * faults[0]


@glibc_pages
def test_released_memory_must_be_faulted_in_again_inside_a_block(untuned_glibc):
    pred, image = _large_map_predictor()
    with reuse_freed_memory():
        first = _faults_of_planes(pred, image, n=2)[0]
        release_freed_memory()
        again = _faults_of_planes(pred, image, n=1)[0]
    assert again > 0.5 * first


@glibc_pages
def test_memory_goes_back_to_the_system_after_each_block(untuned_glibc):
    pred, image = _large_map_predictor()
    faults = _faults_of_planes(pred, image)  # each plane() is a block of its own
    assert faults[2] > 0.5 * faults[0]


@pytest.mark.skipif(not GLIBC, reason="the allocator tuned is glibc's")
def test_a_block_steps_aside_for_a_user_tuned_allocator(untuned_glibc, monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000000")
    runtime._glibc.cache_clear()
    assert runtime._glibc() is None


def test_tiles_match_one_whole_tile():
    diff, pred = _seam_difference("batch")
    assert int(3 / 8 * pred.overlap) >= pred.halo
    assert pred.tile == 64
    assert diff <= 0.02, f"tiled and whole-image probabilities differ by {diff:.3f}"
    # The check can fail: GroupNorm statistics depend on the tile, and this test sees it.
    # (Its receptive field asks for more overlap than a 64 px tile has, so it gets the largest that fits.)
    assert _seam_difference("group", overlap=60)[0] > diff


def test_small_tiles_with_a_large_overlap_match_the_whole_image():
    # Step 8 px: image-border pixels lie in the halo of several tiles; only the border tile's view is right.
    net, _ = random_net(depth=3, seed=4)
    image = np.random.default_rng(1).random((160, 160)).astype(np.float32)
    dev = torch.device("cpu")
    whole = make_predictor(net, dev, backend="torch", tile=160, overlap=0).plane(image)
    tiled = make_predictor(net, dev, backend="torch", tile=64, overlap=56).plane(image)
    assert np.abs(whole - tiled).max() <= 0.02


def _raw_planes():
    """Raw planes of the dtypes a TEM file holds, with values where a careless conversion would go wrong."""
    rng = np.random.default_rng(3)
    u16 = rng.integers(0, 65536, (40, 50)).astype(np.uint16)  # above 32767: the int16 bits cross as they are
    i16 = rng.integers(-32768, 32768, (40, 50)).astype(np.int16)
    f64 = rng.normal(size=(40, 50))
    f64[0, :3] = np.nan, np.inf, -np.inf
    return {"uint8": rng.integers(0, 256, (40, 50)).astype(np.uint8), "uint16": u16, "int16": i16, "float64": f64}


@pytest.mark.parametrize("kind", ["uint8", "uint16", "int16", "float64"])
def test_normalising_where_the_tiles_run_is_bit_identical_to_normalize(kind):
    from tem_ij_plugin.normalization import normalize
    from tem_ij_plugin.predict import _to_device

    raw = _raw_planes()[kind]
    lo, hi = 123.4567, 40000.25
    ours = _to_device(raw, torch.device("cpu"), (lo, hi)).numpy()
    assert np.array_equal(ours, normalize(raw, lo, hi))


def test_a_raw_plane_with_its_range_predicts_as_the_normalised_plane():
    from tem_ij_plugin.normalization import normalize

    net, _ = random_net(depth=2, seed=5)
    raw = _raw_planes()["uint16"]
    pred = make_predictor(net, torch.device("cpu"), backend="torch", tile=64, overlap=16)
    lo, hi = 1000.0, 60000.0
    assert np.array_equal(pred.plane(raw, normalization=(lo, hi)), pred.plane(normalize(raw, lo, hi)))


def test_effective_receptive_field_grows_with_depth():
    shallow = effective_receptive_field(random_net(depth=2)[0])
    deep = effective_receptive_field(random_net(depth=4)[0])
    assert 2 <= shallow < deep < 128


@pytest.mark.skipif(not onnx_available(), reason="onnxruntime (extra [onnx]) not installed")
def test_onnx_matches_torch_within_1e4():
    net, _ = random_net(depth=3)
    image = np.random.default_rng(0).random((200, 150)).astype(np.float32)
    dev = torch.device("cpu")
    ref = make_predictor(net, dev, backend="torch", precision="fp32", tile=128).plane(image)
    onnx = make_predictor(net, dev, backend="onnx", tile=128)
    assert onnx.backend.name == "onnx"
    assert np.abs(onnx.plane(image) - ref).max() <= 1e-4


def test_reduced_precision_is_checked_against_fp32(monkeypatch):
    import tem_ij_plugin.backends as backends

    net, _ = random_net(depth=3)
    probe = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    dev = torch.device("cpu")
    assert make_predictor(net, dev, backend="torch", precision="bf16", probe=probe).precision == "bf16"
    monkeypatch.setattr(backends, "MIN_ARGMAX_AGREEMENT", 1.01)  # now nothing passes
    assert make_predictor(net, dev, backend="torch", precision="bf16", probe=probe).precision == "fp32"


def _two_class(p_cell: np.ndarray) -> np.ndarray:
    return np.stack([1 - p_cell, p_cell]).astype(np.float32)


def test_a_precision_that_changes_nothing_is_accepted():
    from tem_ij_plugin.backends import precision_report

    ref = _two_class(np.random.default_rng(0).random((64, 64)))
    assert precision_report(ref, ref.copy())["accepted"]


def test_a_class_changed_where_fp32_was_sure_is_refused():
    from tem_ij_plugin.backends import precision_report

    p = np.full((100, 100), 0.1)
    p[50:, :] = 0.9  # half cell: one changed pixel leaves each class's IoU above 0.99
    low = p.copy()
    low[0, 0] = 0.6  # fp32 said background with margin 0.8: one confident decision changed
    assert not precision_report(_two_class(p), _two_class(low))["accepted"]


def test_a_class_changed_only_where_fp32_was_undecided_is_accepted():
    from tem_ij_plugin.backends import precision_report

    p = np.full((100, 100), 0.1)
    p[50:, :] = 0.9
    p[0, 0] = 0.49  # nearly a tie in fp32
    low = p.copy()
    low[0, 0] = 0.51
    report = precision_report(_two_class(p), _two_class(low))
    assert report["flip_margin"] == pytest.approx(0.02, abs=1e-6)
    assert report["accepted"]


def test_a_thin_class_that_loses_area_is_refused_even_when_nearly_every_pixel_agrees():
    from tem_ij_plugin.backends import precision_report

    p = np.full((100, 100), 0.1)
    p[:2, :] = 0.52  # a thin, uncertain class region: 200 of 10 000 pixels
    low = p.copy()
    low[:2, :5] = 0.48  # 5 of them change: IoU 0.975
    report = precision_report(_two_class(p), _two_class(low))
    assert report["agreement"] >= 0.999
    assert not report["accepted"]


def test_a_class_on_a_handful_of_pixels_is_judged_by_the_margin_alone():
    from tem_ij_plugin.backends import precision_report

    p = np.full((100, 100), 0.1)
    p[0, :5] = 0.52  # 5 of 10 000 pixels, all nearly undecided
    low = p.copy()
    low[0, :5] = 0.48
    assert precision_report(_two_class(p), _two_class(low))["accepted"]


def test_auto_on_a_cpu_with_native_bf16_keeps_bf16_only_when_it_passes(monkeypatch):
    import tem_ij_plugin.backends as backends

    net, _ = random_net(depth=3)
    probe = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    dev = torch.device("cpu")
    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: True)
    assert make_predictor(net, dev, backend="torch", probe=probe).precision == "bf16"
    monkeypatch.setattr(backends, "MIN_ARGMAX_AGREEMENT", 1.01)
    assert make_predictor(net, dev, backend="torch", probe=probe).precision == "fp32"


def test_auto_on_a_cpu_without_native_bf16_stays_fp32(monkeypatch):
    import tem_ij_plugin.backends as backends

    net, _ = random_net(depth=3)
    probe = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: False)
    assert make_predictor(net, torch.device("cpu"), backend="torch", probe=probe).precision == "fp32"


@pytest.mark.skipif(not onnx_available(), reason="onnxruntime not installed")
def test_a_kept_onnx_graph_is_reused_without_exporting_again(tmp_path, monkeypatch):
    import tem_ij_plugin.backends as backends
    from tem_ij_plugin.backends import OnnxBackend

    net = fold_batchnorm(random_net(depth=3)[0])
    first = OnnxBackend(net, cache=tmp_path)
    assert len(list(tmp_path.glob("*.onnx"))) == 1
    monkeypatch.setattr(backends, "export_onnx", lambda *a, **k: pytest.fail("exported again"))
    x = np.random.default_rng(0).random((1, 1, 64, 96)).astype(np.float32)
    assert np.array_equal(OnnxBackend(net, cache=tmp_path)(x), first(x))


@pytest.mark.skipif(not onnx_available(), reason="onnxruntime not installed")
def test_a_damaged_kept_graph_is_exported_again(tmp_path):
    from tem_ij_plugin.backends import OnnxBackend

    net = fold_batchnorm(random_net(depth=3)[0])
    OnnxBackend(net, cache=tmp_path)
    kept = next(tmp_path.glob("*.onnx"))
    kept.write_bytes(b"not an onnx graph")
    x = np.random.default_rng(0).random((1, 1, 64, 64)).astype(np.float32)
    assert OnnxBackend(net, cache=tmp_path)(x).shape == (1, 2, 64, 64)
    assert kept.read_bytes() != b"not an onnx graph"


@pytest.mark.skipif(not onnx_available(), reason="onnxruntime not installed")
def test_a_killed_writers_temporary_graph_is_removed_when_a_graph_is_kept(tmp_path):
    from tem_ij_plugin.backends import STALE_PARTIAL_S, OnnxBackend

    left = tmp_path / ".abc.onnx.999999.partial"
    left.write_bytes(b"half a graph")
    old = os.stat(left).st_mtime - STALE_PARTIAL_S - 60
    os.utime(left, (old, old))
    OnnxBackend(fold_batchnorm(random_net(depth=3)[0]), cache=tmp_path)
    assert not left.exists()


@pytest.mark.skipif(not onnx_available(), reason="onnxruntime not installed")
def test_a_kept_graph_of_another_model_is_refused(tmp_path):
    from tem_ij_plugin.backends import OnnxBackend, export_onnx, graph_key

    net, other = (fold_batchnorm(random_net(depth=3, seed=s)[0]) for s in (0, 1))
    (tmp_path / f"{graph_key(net)}.onnx").write_bytes(export_onnx(other))  # under this model's key
    backend = OnnxBackend(net, cache=tmp_path)
    x = torch.rand((1, 1, 64, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = torch.softmax(net(x), dim=1).numpy()
    assert np.abs(backend(x) - ref).max() <= 1e-4


@pytest.mark.skipif(not onnx_available(), reason="onnxruntime not installed")
def test_the_graph_cache_keeps_only_the_most_recent_graphs(tmp_path, monkeypatch):
    import tem_ij_plugin.backends as backends
    from tem_ij_plugin.backends import OnnxBackend, graph_key

    monkeypatch.setattr(backends, "KEPT_GRAPHS", 1)
    first, second = (fold_batchnorm(random_net(depth=3, seed=s)[0]) for s in (0, 1))
    OnnxBackend(first, cache=tmp_path)
    OnnxBackend(second, cache=tmp_path)
    assert [p.name for p in tmp_path.glob("*.onnx")] == [f"{graph_key(second)}.onnx"]


@pytest.mark.skipif(not onnx_available(), reason="onnxruntime not installed")
def test_int8_whose_quantisation_fails_falls_back_to_fp32(monkeypatch):
    import tem_ij_plugin.backends as backends

    def broken(self, calibration):
        raise RuntimeError("quantiser broke")

    monkeypatch.setattr(backends.OnnxBackend, "quantized", broken)
    net, _ = random_net(depth=3)
    probe = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    assert make_predictor(net, torch.device("cpu"), precision="int8", probe=probe).precision == "fp32"


def _accept_anything(monkeypatch):
    import tem_ij_plugin.backends as backends

    monkeypatch.setattr(backends, "MIN_ARGMAX_AGREEMENT", 0.0)
    monkeypatch.setattr(backends, "MIN_CLASS_IOU", 0.0)
    monkeypatch.setattr(backends, "MAX_FLIP_MARGIN", 1.0)


@pytest.mark.skipif(not onnx_available(), reason="onnxruntime not installed")
def test_int8_runs_a_quantised_graph_close_to_fp32(monkeypatch):
    _accept_anything(monkeypatch)
    net, _ = random_net(depth=3)
    image = np.random.default_rng(0).random((200, 150)).astype(np.float32)
    dev = torch.device("cpu")
    int8 = make_predictor(net, dev, precision="int8", tile=128, probe=image[:128, :128])
    assert int8.precision == "int8"
    ref = make_predictor(net, dev, backend="onnx", tile=128).plane(image)
    assert np.abs(int8.plane(image) - ref).mean() < 0.05


@pytest.mark.skipif(not onnx_available(), reason="onnxruntime not installed")
def test_onnx_sessions_plan_no_memory_pattern():
    from tem_ij_plugin.backends import OnnxBackend

    backend = OnnxBackend(fold_batchnorm(random_net(depth=2)[0]).float())
    assert backend.session.get_session_options().enable_mem_pattern is False


@pytest.mark.skipif(not onnx_available(), reason="onnxruntime not installed")
def test_int8_calibration_is_reproducible():
    from tem_ij_plugin.backends import OnnxBackend

    fp32 = OnnxBackend(fold_batchnorm(random_net(depth=2)[0]).float())
    crop = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    assert fp32.quantized(crop).onnx_bytes == fp32.quantized(crop).onnx_bytes


@pytest.mark.skipif(not onnx_available(), reason="onnxruntime not installed")
def test_int8_calibration_uses_every_crop_it_is_given():
    from tem_ij_plugin.backends import OnnxBackend

    net, _ = random_net(depth=2)
    fp32 = OnnxBackend(fold_batchnorm(net).float())
    # Ranges always include 0: crops on either side of it give each its own input range.
    dark = np.full((64, 64), -3.0, np.float32)
    bright = np.full((64, 64), 3.0, np.float32)
    both = fp32.quantized([dark, bright]).onnx_bytes
    assert both not in (fp32.quantized(dark).onnx_bytes, fp32.quantized(bright).onnx_bytes)


def _first_conv_weight_quantised(keep_first: bool) -> bool:
    """Whether int8 quantisation gives the first convolution an int8 weight (read through DequantizeLinear)."""
    import onnx

    from tem_ij_plugin.backends import OnnxBackend

    fp32 = OnnxBackend(fold_batchnorm(random_net(depth=2)[0]).float())
    first = fp32.node_names("Conv")[0]
    crop = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    graph = onnx.load_from_string(fp32.quantized(crop, keep_fp32=[first] if keep_first else []).onnx_bytes).graph
    dequantised = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    return next(n for n in graph.node if n.name == first).input[1] in dequantised


@pytest.mark.skipif(not onnx_available(), reason="onnxruntime not installed")
def test_int8_keeps_the_named_convolutions_in_fp32():
    assert not _first_conv_weight_quantised(keep_first=True)


@pytest.mark.skipif(not onnx_available(), reason="onnxruntime not installed")
def test_int8_quantises_every_convolution_it_is_not_told_to_keep():
    assert _first_conv_weight_quantised(keep_first=False)


@pytest.mark.skipif(not onnx_available(), reason="onnxruntime not installed")
def test_int8_refuses_to_keep_a_node_the_graph_does_not_have():
    from tem_ij_plugin.backends import OnnxBackend

    fp32 = OnnxBackend(fold_batchnorm(random_net(depth=2)[0]).float())
    crop = np.zeros((64, 64), np.float32)
    with pytest.raises(ValueError, match="no node of the graph is named /net/typo"):
        fp32.quantized(crop, keep_fp32=["/net/typo"])


@pytest.mark.skipif(not onnx_available(), reason="onnxruntime not installed")
def test_int8_that_fails_the_acceptance_test_falls_back_to_fp32(monkeypatch):
    import tem_ij_plugin.backends as backends

    monkeypatch.setattr(backends, "MIN_ARGMAX_AGREEMENT", 1.01)
    net, _ = random_net(depth=3)
    probe = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    assert make_predictor(net, torch.device("cpu"), precision="int8", probe=probe).precision == "fp32"


@pytest.mark.skipif(not onnx_available(), reason="onnxruntime not installed")
def test_an_onnxruntime_that_is_found_but_does_not_import_is_a_user_error(tmp_path, monkeypatch):
    # A real package of that name that fails on import, as a broken install does (not a mock of ours).
    broken = tmp_path / "site" / "onnxruntime"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('libonnxruntime.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in [m for m in sys.modules if m == "onnxruntime" or m.startswith("onnxruntime.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setenv("TEM_IJ_CACHE", str(tmp_path / "cache"))
    net, _ = random_net(depth=3)
    with pytest.raises(UserError, match="installed but does not import"):
        make_predictor(net, torch.device("cpu"), backend="onnx")


def test_int8_needs_onnxruntime_on_the_cpu():
    net, _ = random_net(depth=3)
    with pytest.raises(UserError, match="int8 runs on the CPU with onnxruntime"):
        make_predictor(net, torch.device("cpu"), backend="torch", precision="int8")


def test_the_probe_is_the_centre_of_the_plane():
    from tem_ij_plugin.predict import probe_crop

    plane = np.arange(1000 * 800, dtype=np.float32).reshape(1000, 800)
    crop = probe_crop(plane, 512)
    assert crop.shape == (512, 512)
    assert crop[0, 0] == plane[244, 144]


def test_backend_and_precision_errors():
    net, _ = random_net()
    with pytest.raises(UserError, match="unknown backend"):
        make_predictor(net, torch.device("cpu"), backend="tensorrt")
    with pytest.raises(UserError, match="onnx backend computes in fp32"):
        make_predictor(net, torch.device("cpu"), backend="onnx", precision="bf16")


# --- tem-ij predict: outputs, resume, bad input ---------------------------------------------------------------


@pytest.fixture()
def model_file(tmp_path):
    """A random model with what training records beside the weights (the job and its resume carry them)."""
    recorded = {"patch_size": 256, "object_areas": {"cell": {"count": 7, "median_px": 900.0}}}
    return save_random_model(tmp_path / "m.model", recorded)


def test_predict_stack_both_outputs_uint8_with_calibration_and_labels(stack, model_file, capsys, tmp_path):
    path, data = stack
    before = sha256(path)
    out = tmp_path / "p.tif"
    code, stdout, err = run(
        capsys, "predict", model_file, path, "-o", out, "--kind", "both", "--dtype", "uint8", "--backend", "torch"
    )
    assert code == 0, err
    with tifffile.TiffFile(out) as tif:
        probs = tif.series[0].asarray()
        assert tif.series[0].axes == "ZCYX"
        assert probs.dtype == np.uint8
        assert probs.shape == (3, 2, 256, 256)
        assert tif.imagej_metadata["Labels"][:3] == ["background: s1", "cell: s1", "background: s2"]
        assert tif.imagej_metadata["spacing"] == pytest.approx(0.05)
        assert tif.pages[0].tags["XResolution"].value[0] / tif.pages[0].tags["XResolution"].value[1] == 200
    assert np.all(np.abs(probs.astype(int).sum(1) - 255) <= 1)
    labels = tifffile.imread(tmp_path / "p_labels.tif")
    assert labels.shape == (3, 256, 256)
    assert np.array_equal(labels, probs.argmax(1))
    assert sha256(path) == before
    assert not list(tmp_path.glob("*partial*")), "no partial files remain after a complete run"


def test_predict_classes_subset_to_zarr(stack, model_file, capsys, tmp_path):
    zarr = pytest.importorskip("zarr")
    path, _ = stack
    out = tmp_path / "p.zarr"
    code, _, err = run(capsys, "predict", model_file, path, "-o", out, "--classes", "cell", "--backend", "torch")
    assert code == 0, err
    full = tmp_path / "full.tif"
    assert run(capsys, "predict", model_file, path, "-o", full, "--backend", "torch")[0] == 0
    arr = zarr.open_array(str(out / "0"), mode="r")
    assert arr.shape == (1, 3, 256, 256)
    assert np.array_equal(arr[0], tifffile.imread(full)[:, 1])


def test_cancel_then_resume_completes_without_redoing_planes(stack, model_file, tmp_path):
    path, _ = stack
    out = tmp_path / "p.tif"
    cancel = threading.Event()

    def stop_after_first_plane(ev):
        if ev["done"] >= 1:
            cancel.set()

    job = PredictJob(model_file, path, out, backend="torch")
    with pytest.raises(Cancelled):
        job.run(progress=stop_after_first_plane, cancel=cancel)
    assert job.planes_done == 1
    assert not out.exists()
    partial = tmp_path / "p.partial.tif"
    with tifffile.TiffFile(partial) as tif:
        assert tif.series[0].shape == (3, 2, 256, 256), "the partial output is a valid TIFF"
    assert list(json.loads((tmp_path / "p.partial.json").read_text())["planes"]) == ["0"]

    with pytest.raises(UserError, match="--resume"):
        PredictJob(model_file, path, out, backend="torch").run()
    with pytest.raises(UserError, match="cannot resume: tile"):
        PredictJob(model_file, path, out, backend="torch", tile=128, resume=True).run()
    with pytest.raises(UserError, match=r"it used --tile \d+\)"):
        PredictJob(model_file, path, out, backend="torch", tile=128, resume=True).run()

    planes = set()
    PredictJob(model_file, path, out, backend="torch", resume=True).run(progress=lambda ev: planes.add(ev["plane"]))
    assert planes == {2, 3}, "finished planes are not predicted again"
    fresh = tmp_path / "fresh.tif"
    PredictJob(model_file, path, fresh, backend="torch").run()
    assert np.array_equal(tifffile.imread(out), tifffile.imread(fresh))
    assert not partial.exists()
    assert not (tmp_path / "p.partial.json").exists()


def _interrupt(model_file, path, out):
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        PredictJob(model_file, path, out, backend="torch").run(
            progress=lambda ev: ev["done"] >= 1 and cancel.set(), cancel=cancel
        )
    return json.loads(out.with_name(f"{out.stem}.partial.json").read_text())["signature"]["tile"]


def test_a_resume_keeps_the_interrupted_runs_default_tile_when_more_memory_is_free(
    stack, model_file, tmp_path, monkeypatch
):
    # The machine's free memory cannot be changed by a test, so its reading is replaced.
    import tem_ij_plugin.predict as predict_module

    path, _ = stack
    monkeypatch.setattr(predict_module, "available_memory", lambda: 1)
    tight = _interrupt(model_file, path, tmp_path / "p.tif")
    monkeypatch.setattr(predict_module, "available_memory", lambda: 64 << 30)
    fresh = PredictJob(model_file, path, tmp_path / "fresh.tif", backend="torch")
    fresh.run()
    assert fresh.state.signature["tile"] > tight, "the test needs a default tile that the free memory changes"
    resumed = PredictJob(model_file, path, tmp_path / "p.tif", backend="torch", resume=True)
    resumed.run()
    assert resumed.state.signature["tile"] == tight


def test_a_resume_with_less_free_memory_names_the_tile_to_pass(stack, model_file, tmp_path, monkeypatch):
    import tem_ij_plugin.predict as predict_module

    path, _ = stack
    monkeypatch.setattr(predict_module, "available_memory", lambda: 64 << 30)
    roomy = _interrupt(model_file, path, tmp_path / "p.tif")
    monkeypatch.setattr(predict_module, "available_memory", lambda: 1)
    with pytest.raises(UserError, match=rf"it used --tile {roomy}\)"):
        PredictJob(model_file, path, tmp_path / "p.tif", backend="torch", resume=True).run()


def test_output_over_the_file_size_limit_is_a_clear_error(stack, model_file, tmp_path):
    path, _ = stack
    out = tmp_path / "p.btf"
    # A real limit on file size (as on a nearly full or quota-limited disk): the pre-allocation fails.
    code = (
        "import resource, sys; from tem_ij_plugin.cli import main; "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000)); "
        f"sys.exit(main(['predict', {str(model_file)!r}, {str(path)!r}, '-o', {str(out)!r}, '--backend', 'torch']))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert "File too large" in res.stderr, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.model", "stack.tif"], "nothing half-written is left"


def test_disk_full_mid_run_keeps_finished_planes_for_resume(stack, model_file, tmp_path, monkeypatch):
    import errno

    path, _ = stack
    out = tmp_path / "p.tif"
    real_write = TiffPlaneWriter.write

    def write(self, i, plane):
        # A disk that fills up cannot be arranged in CI; this raises what the OS raises then (ENOSPC).
        if i == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, i, plane)

    monkeypatch.setattr(TiffPlaneWriter, "write", write)
    with pytest.raises(UserError, match=r"No space left on device.*1 of 3 plane.*p\.partial\.tif.*--resume"):
        PredictJob(model_file, path, out, backend="torch").run()
    assert not out.exists()
    assert list(json.loads((tmp_path / "p.partial.json").read_text())["planes"]) == ["0"]
    monkeypatch.setattr(TiffPlaneWriter, "write", real_write)
    PredictJob(model_file, path, out, backend="torch", resume=True).run()
    assert tifffile.imread(out).shape == (3, 2, 256, 256)
    assert not (tmp_path / "p.partial.tif").exists()


@pytest.mark.parametrize(
    "case, message",
    [
        ("two_channel_model", "expects 2 input channels"),
        ("foreign_normalisation", "normalises images with 'zscore'"),
        ("constant_image", "no contrast"),
        ("unknown_class", "unknown class.*mito"),
        ("bad_suffix", "unknown output type '.png'"),
        ("channel_image", "2 channels.*--channel"),
        ("empty_stack", "empty stack"),
    ],
)
def test_predict_bad_input_is_exit_2(case, message, stack, model_file, capsys, tmp_path):
    path, _ = stack
    model, image, extra, out = model_file, path, [], tmp_path / "o.tif"
    if case == "two_channel_model":
        model = save_random_model(tmp_path / "two.model", in_channels=2)
    elif case == "foreign_normalisation":
        net, arch = random_net()
        meta = {"classes": ["background", "cell"], "architecture": arch, "normalization": {"method": "zscore"}}
        save_model(tmp_path / "z.model", TrainedModel(net, meta))
        model = tmp_path / "z.model"
    elif case == "constant_image":
        image = tmp_path / "flat.tif"
        tifffile.imwrite(image, np.full((64, 64), 7, np.uint8))
    elif case == "unknown_class":
        extra = ["--classes", "cell,mito"]
    elif case == "bad_suffix":
        out = tmp_path / "o.png"
    elif case == "empty_stack":
        image = tmp_path / "empty.tif"
        with tifffile.TiffWriter(image):
            pass  # a valid TIFF header without a single image
    elif case == "channel_image":
        image = tmp_path / "c.tif"
        tifffile.imwrite(image, np.zeros((2, 32, 32), np.uint8), imagej=True, metadata={"axes": "CYX"})
    code, _, err = run(capsys, "predict", model, image, "-o", out, *extra)
    assert code == 2
    assert "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert not out.exists()


def test_prediction_events_carry_exactly_the_keys_of_their_contract(stack, model_file, tmp_path):
    from tem_ij_plugin.events import PredictEvent

    events = []
    PredictJob(model_file, stack[0], tmp_path / "p.tif", backend="torch", tile=128).run(progress=events.append)
    assert {frozenset(ev) for ev in events} == {frozenset(PredictEvent.__annotations__)}


def test_predict_progress_reports_tiles_throughput_and_eta(stack, model_file, tmp_path):
    path, _ = stack
    events = []
    PredictJob(model_file, path, tmp_path / "p.tif", backend="torch", tile=128).run(progress=events.append)
    last = events[-1]
    assert last["done"] == last["total"] == 3
    assert last["tiles_done"] == last["tiles_total"] > 1
    assert last["megapixels_per_s"] > 0
    assert last["eta_s"] == pytest.approx(0, abs=1e-6)
    assert any(ev["tiles_done"] < ev["tiles_total"] for ev in events), "progress within a plane too"


def test_unwritable_partial_location_is_exit_2(stack, model_file, capsys, tmp_path):
    path, _ = stack
    code, _, err = run(capsys, "predict", model_file, path, "-o", tmp_path / "missing" / "p.tif")
    assert code == 2
    assert "does not exist" in err
    assert sorted(os.listdir(tmp_path)) == ["m.model", "stack.tif"], "nothing is written"


def test_version_1_groupnorm_model_files_still_predict(stack, tmp_path):
    net, arch = random_net(norm="group")
    arch.pop("norm")  # files of format 1 (tem_ij_plugin 0.1) have no "norm": they are GroupNorm models
    meta = {"classes": ["background", "cell"], "architecture": arch, "normalization": dict(DEFAULT_NORMALIZATION)}
    save_model(tmp_path / "old.model", TrainedModel(net, meta))
    PredictJob(tmp_path / "old.model", stack[0], tmp_path / "p.tif", backend="torch").run()
    probs = tifffile.imread(tmp_path / "p.tif")
    assert probs.shape == (3, 2, 256, 256)
    assert np.allclose(probs.sum(1), 1, atol=1e-4)


@pytest.mark.parametrize("checked", [False, True])
def test_auto_precision_is_fp32_on_a_cpu_for_training_and_prediction(checked):
    from tem_ij_plugin.runtime import resolve_precision

    assert resolve_precision(torch.device("cpu"), "auto", checked) == "fp32"


def test_an_explicit_precision_is_kept():
    from tem_ij_plugin.runtime import resolve_precision

    assert resolve_precision(torch.device("cpu"), "bf16") == "bf16"


def test_a_partial_tiff_cut_short_while_it_was_created_is_not_resumed(tmp_path):
    """A kill while the file was being created can leave the pixel block sized but later IFDs missing;
    tifffile's ImageJ shortcut still reads the planes, so the page count is what tells."""
    import struct

    from tem_ij_plugin.stackio import PartialMismatch

    lay = Layout("Z", (3,), 2, (16, 16), np.dtype(np.float32))
    TiffPlaneWriter(tmp_path / "o.tif", lay, Calibration()).close()
    with tifffile.TiffFile(tmp_path / "o.partial.tif") as tif:
        first = tif.pages[0].offset
    with open(tmp_path / "o.partial.tif", "r+b") as f:  # end the IFD chain after the first page
        f.seek(first)
        (count,) = struct.unpack("<H", f.read(2))
        f.seek(first + 2 + 12 * count)
        f.write(b"\0\0\0\0")
    with pytest.raises(PartialMismatch, match="1 of its 6 pages"):
        TiffPlaneWriter(tmp_path / "o.tif", lay, Calibration(), resume=True)

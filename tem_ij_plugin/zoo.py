"""Models out as BioImage Model Zoo packages (bioimage.io model spec 0.5), and our own packages back in.

A package is a zip of ``rdf.yaml`` and the files it names: the weights as a PyTorch state dict (with
this package's network source as the architecture), TorchScript and ONNX; a test input and the output
the weights give on it; a cover; a README with the training history. The input normalisation is the
spec's own ``scale_range`` preprocessing (per-image percentiles, as ``tem-ij predict`` normalises a
single plane), so a zoo tool feeds the network what it saw in training. The ``.model`` file itself
travels as an attachment, which is how ``tem-ij predict`` runs a package it exported.

Nothing here imports bioimageio: the YAML is written directly, and the tests check it with the Zoo's
own validator and test runner (``bioimageio test``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = "0.5.4"  # the bioimage.io model spec the RDF follows (validated with bioimageio.spec 0.5.x)
RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
EPS = 1e-6  # scale_range's epsilon, also in the test output we compute
ARCH_FILE = "tem_ij_unet.py"
PLACEHOLDER = "FILL IN"
ATTACHED_MODEL = "tem_ij_plugin.model"  # a fixed name: the user's file name could be any of the package's


@dataclass
class Exported:
    """What :func:`export_package` wrote.

    Attributes
    ----------
    path : Path
        The zip.
    files : list of str
        The files in it.
    placeholders : list of str
        RDF fields left for the user to fill (authors, citation), in words.
    """

    path: Path
    files: list
    placeholders: list


def scale_range(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """bioimage.io's ``scale_range`` over the last two axes: ``(x - p_low) / (p_high - p_low + eps)``."""
    lo, hi = np.percentile(x, [low, high], axis=(-2, -1), keepdims=True)
    return ((x - lo) / (hi - lo + EPS)).astype(np.float32)


def _test_input(model, image_path, size: int) -> np.ndarray:
    """A (1, 1, size, size) crop: the centre of the first plane of ``image_path``, else a synthetic TEM image."""
    from .io import PlaneReader
    from .synthetic import make_tem_image

    if image_path is None:
        plane = make_tem_image(size, size, seed=11)[0]
    else:
        with PlaneReader(image_path) as r:
            plane = r.read(0)
        if min(plane.shape) < size:
            raise UserError(f"{image_path} is smaller than the {size}x{size} test input the package needs")
        y0, x0 = (plane.shape[0] - size) // 2, (plane.shape[1] - size) // 2
        plane = plane[y0 : y0 + size, x0 : x0 + size]
    return np.asarray(plane, np.float32)[None, None]


def _sizes(model) -> tuple[int, int, int]:
    """(halo, minimum input side, step): the receptive-field halo and the input sizes the network takes."""
    from .receptive import HALO_MASS, effective_receptive_field, fold_batchnorm

    step = model.net.size_multiple
    erf = model.meta.get("effective_receptive_field") or {}
    halo = erf.get("radius") if erf.get("mass") == HALO_MASS else None
    if halo is None:
        halo = effective_receptive_field(fold_batchnorm(model.net).float(), HALO_MASS)
    halo = int(np.ceil(halo))
    minimum = int(np.ceil((2 * halo + step) / step) * step)
    return halo, minimum, step


def export_package(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    image_path: str | os.PathLike | None = None,
    name: str | None = None,
    license_id: str = "CC-BY-4.0",
) -> Exported:
    """Write a model file as a bioimage.io model package (a zip).

    Parameters
    ----------
    model_path : path
        A ``.model`` file.
    out : path
        The zip to write (written next to its name and moved into place).
    image_path : path, optional
        An image whose first plane's centre becomes the test input (default: a synthetic TEM image).
    name : str, optional
        The model's name in the Zoo (default: the file's name).
    license_id : str
        An SPDX licence identifier for the weights.

    Raises
    ------
    UserError
        A model that is not ours, an image smaller than the test input.
    """
    from .modelio import load_model
    from .outputs import PACKAGE_ZIP_COMMENT, atomic_write

    model_path, out = Path(model_path), Path(out)
    model = load_model(model_path)
    model.net.eval().float()
    halo, minimum, step = _sizes(model)
    size = max(256, minimum)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = _write_files(model, model_path, folder, _test_input(model, image_path, size))
        name = _zoo_name(name or model_path.stem)
        rdf, placeholders = _rdf(model, folder, files, name, license_id, (halo, minimum, step))
        (folder / "rdf.yaml").write_text(rdf, encoding="utf-8")
        names = ["rdf.yaml", *files.values()]

        def write(tmp_zip: Path) -> None:
            with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_DEFLATED) as zf:
                for n in names:
                    zf.write(folder / n, n)
                zf.comment = PACKAGE_ZIP_COMMENT  # how a later export knows it may replace this file

        atomic_write(out, write)
    return Exported(out, names, placeholders)


def _zoo_name(name: str) -> str:
    """A name the spec accepts: 5 to 128 letters, digits, spaces and ``_-().``."""
    import re

    name = re.sub(r"[^A-Za-z0-9 _().-]+", " ", name).strip()[:100]
    return name if len(name) >= 5 else f"{name} TEM segmentation".strip()


def _write_files(model, model_path: Path, folder: Path, x: np.ndarray) -> dict:
    """Every file of the package but the RDF; returns {role: file name}."""
    import tifffile
    import torch

    from .backends import export_onnx
    from .figures import probability_rgb, side_by_side, to_rgb
    from .nn import ProbabilityUNet
    from .nn import unet as unet_source

    net = ProbabilityUNet(**_arch_kwargs(model.meta["architecture"])).eval()
    net.load_state_dict(model.net.state_dict())
    low, high = model.normalization.get("low", 1.0), model.normalization.get("high", 99.8)
    with torch.no_grad():
        y = net(torch.from_numpy(scale_range(x, low, high))).numpy()
    files = {
        "test_input": "test_input.npy", "test_output": "test_output.npy", "state_dict": "weights.pt",
        "architecture": ARCH_FILE, "torchscript": "weights_torchscript.pt", "onnx": "weights.onnx",
        "cover": "cover.png", "documentation": "README.md", "model": ATTACHED_MODEL,
        "sample_input": "sample_input.tif", "sample_output": "sample_output.tif",
    }  # fmt: skip
    np.save(folder / files["test_input"], x)
    np.save(folder / files["test_output"], y.astype(np.float32))
    tifffile.imwrite(folder / files["sample_input"], x[0, 0])
    tifffile.imwrite(folder / files["sample_output"], y[0].astype(np.float32))
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, folder / files["state_dict"])
    shutil.copyfile(unet_source.__file__, folder / files["architecture"])
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated in torch, but it is the Zoo's format that deepImageJ runs.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(net, torch.from_numpy(x)).save(str(folder / files["torchscript"]))
    (folder / files["onnx"]).write_bytes(export_onnx(model.net))
    _cover(folder / files["cover"], x[0, 0], y[0], to_rgb, probability_rgb, side_by_side)
    (folder / files["documentation"]).write_text(_readme(model, model_path), encoding="utf-8")
    shutil.copyfile(model_path, folder / files["model"])
    return files


def _arch_kwargs(arch: dict) -> dict:
    """The network's constructor arguments from a model's architecture record."""
    return {
        "in_channels": int(arch.get("in_channels", 1)), "n_classes": int(arch["n_classes"]),
        "depth": int(arch["depth"]), "base_channels": int(arch["base_channels"]), "steps": int(arch["steps"]),
        "norm_groups": int(arch.get("norm_groups", 8)), "feedback": str(arch.get("feedback", "input")),
        "norm": str(arch.get("norm", "group")),
    }  # fmt: skip


def _cover(path: Path, image, probs, to_rgb, probability_rgb, side_by_side) -> None:
    """The demo figure's style: the test input and the probability of the first class that is not background."""
    import imageio.v3 as iio

    lo, hi = np.percentile(image, [1, 99.8])
    gray = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
    panels = [to_rgb(gray), probability_rgb(probs[1])]
    iio.imwrite(path, side_by_side(panels))


def _readme(model, model_path: Path) -> str:
    """The package's documentation: what the model segments, how it was trained, how to run it."""
    low, high = model.normalization.get("low", 1.0), model.normalization.get("high", 99.8)
    lines = [
        f"# {model_path.stem}",
        "",
        "A TEM segmentation model trained with [tem_ij_plugin](https://pypi.org/project/tem-ij-plugin/) from "
        "partially annotated patches.",
        "",
        f"* Classes (output channels, in order): {', '.join(model.classes)}",
        f"* Input: one greyscale channel, scaled so that its {low:g}th and {high:g}th percentiles map to 0 and 1 "
        "(the package's `scale_range` preprocessing does this).",
        "* Output: the probability of each class per pixel (softmax).",
        "",
        "## Training history",
        "",
        "| round | iterations | best validation mIoU | training patches | validation patches |",
        "| --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(model.rounds, 1):
        score = r.get("best_score")
        lines.append(
            f"| {r.get('round', i)} | {r.get('iterations', '')} | {'' if score is None else f'{score:.3f}'} "
            f"| {len(r.get('train_patches') or [])} | {len(r.get('val_patches') or [])} |"
        )
    lines += [
        "",
        "The validation score is measured on the labelled pixels of held-out annotated patches; it "
        "overstates the score on every pixel of unseen images.",
        "",
        "## Validation",
        "",
        "tem_ij_plugin's benchmarks (its README) compare the training method with a random forest and with "
        "dense labels on ISBI 2012; this model itself was validated only on its held-out annotated patches "
        f"(above). {PLACEHOLDER}: how you checked it on your data.",
        "",
        "## Running it",
        "",
        "* `tem-ij predict THIS.zip image.tif -o probs.tif` (tem_ij_plugin) runs the packaged `.model` file.",
        "* bioimage.io tools (bioimageio.core, deepImageJ, ilastik) run the TorchScript, ONNX or PyTorch weights.",
        "",
        f"Authors, citation and licence: {PLACEHOLDER} in rdf.yaml before sharing this package.",
        "",
    ]
    return "\n".join(lines)


def _rdf(model, folder: Path, files: dict, name: str, license_id: str, sizes) -> tuple[str, list]:
    """The package's ``rdf.yaml`` text and the fields left for the user to fill."""
    import torch
    import yaml

    from . import __version__

    halo, minimum, step = sizes
    from .apply import file_digest

    sha = {role: file_digest(folder / f) for role, f in files.items()}
    torch_version = torch.__version__.split("+")[0]
    space_in = [{"type": "space", "id": a, "size": {"min": minimum, "step": step}} for a in ("y", "x")]
    space_out = [
        {"type": "space", "id": a, "size": {"tensor_id": "raw", "axis_id": a}, "halo": halo} for a in ("y", "x")
    ]
    low, high = model.normalization.get("low", 1.0), model.normalization.get("high", 99.8)
    placeholders = ["authors (name, affiliation)", "cite (text and DOI or URL of the work to cite)"]
    rdf = {
        "type": "model",
        "format_version": FORMAT_VERSION,
        "name": name,
        "description": f"TEM segmentation ({', '.join(model.classes)}) trained with tem_ij_plugin from partial "
        "annotations",
        "authors": [{"name": f"{PLACEHOLDER}: your name", "affiliation": f"{PLACEHOLDER}: your institute"}],
        "cite": [{"text": f"{PLACEHOLDER}: the work to cite for this model", "url": "https://example.org"}],
        "license": license_id,
        "tags": ["electron-microscopy", "tem", "semantic-segmentation", "2d", "pytorch", "tem_ij_plugin"],
        "documentation": files["documentation"],
        "covers": [files["cover"]],
        "attachments": [{"source": files["model"], "sha256": sha["model"]}],
        "inputs": [{
            "id": "raw",
            "description": "greyscale TEM image",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["raw"]}, *space_in],
            "test_tensor": {"source": files["test_input"], "sha256": sha["test_input"]},
            "sample_tensor": {"source": files["sample_input"], "sha256": sha["sample_input"]},
            "data": {"type": "float32"},
            "preprocessing": [{
                "id": "scale_range",
                "kwargs": {"axes": ["y", "x"], "min_percentile": low, "max_percentile": high, "eps": EPS},
            }],
        }],
        "outputs": [{
            "id": "probabilities",
            "description": "class probabilities (softmax)",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": list(model.classes)}, *space_out],
            "test_tensor": {"source": files["test_output"], "sha256": sha["test_output"]},
            "sample_tensor": {"source": files["sample_output"], "sha256": sha["sample_output"]},
            "data": {"type": "float32", "range": [0.0, 1.0]},
        }],
        "weights": {
            "pytorch_state_dict": {
                "source": files["state_dict"], "sha256": sha["state_dict"], "pytorch_version": torch_version,
                "architecture": {
                    "source": files["architecture"], "sha256": sha["architecture"], "callable": "ProbabilityUNet",
                    "kwargs": _arch_kwargs(model.meta["architecture"]),
                },
            },
            "torchscript": {"source": files["torchscript"], "sha256": sha["torchscript"],
                            "pytorch_version": torch_version, "parent": "pytorch_state_dict"},
            "onnx": {"source": files["onnx"], "sha256": sha["onnx"], "opset_version": 17,
                     "parent": "pytorch_state_dict"},
        },
        "config": {"tem_ij_plugin": {"version": __version__, "model": files["model"]}},
    }  # fmt: skip
    return yaml.safe_dump(rdf, sort_keys=False, allow_unicode=True), placeholders


# -- our packages back in -----------------------------------------------------------------------------------


MAX_RDF_BYTES = 1 << 20


def is_package(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a zip with a bioimage.io RDF at its top."""
    p = Path(path)
    try:
        if not p.is_file() or not zipfile.is_zipfile(p):
            return False
        with zipfile.ZipFile(p) as zf:
            return any(n in RDF_NAMES for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):  # looks like a zip, is none: read as a model file (and refused there)
        return False


def extract_model(path: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """The ``.model`` file a package of ours carries, extracted into ``folder``.

    Raises
    ------
    UserError
        A package from elsewhere (no tem_ij_plugin model attached): running foreign zoo models is not
        supported yet; a damaged package.
    """
    import yaml

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            rdf_name = next(n for n in RDF_NAMES if n in zf.namelist())
            info = zf.getinfo(rdf_name)
            if info.file_size > MAX_RDF_BYTES:
                raise UserError(f"{path}: its {rdf_name} is {info.file_size} bytes, more than an RDF we read")
            rdf = yaml.safe_load(zf.read(rdf_name))
            config = rdf.get("config") if isinstance(rdf, dict) else None
            ours = config.get("tem_ij_plugin") if isinstance(config, dict) else None
            name = ours.get("model") if isinstance(ours, dict) else None
            if not isinstance(name, str) or "/" in name or "\\" in name or name not in zf.namelist():
                raise UserError(
                    f"{path} is a bioimage.io package that tem_ij_plugin did not export; running other zoo models "
                    "is not supported yet (use bioimageio.core, deepImageJ or ilastik for it)"
                )
            target = Path(folder) / Path(name).name
            with zf.open(name) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, OSError, yaml.YAMLError, StopIteration) as exc:
        raise UserError(f"{path} is not a readable bioimage.io package ({exc})") from exc
    return target

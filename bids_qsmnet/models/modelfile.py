"""The bids_qsmnet model file: one ``.safetensors`` file with the weights and a JSON spec.

Format (``format_version`` 1)
-----------------------------
* **Tensors**: the network's state dict, key by key (``down_0.convs.conv_0.conv.weight``, ...).
  Floating-point tensors are stored as float32; integer buffers (batch norm's
  ``num_batches_tracked``) as int64.
* **Metadata**: the safetensors header's ``__metadata__`` holds one entry, key
  ``"bids_qsmnet"``, whose value is a JSON object (see :class:`ModelSpec`):

  ``format_version``   int, 1
  ``name``             str, the model's name
  ``architecture``     the :class:`~bids_qsmnet.models.unet.UNet3d` config
  ``normalization``    ``{input_mean, input_std, label_mean, label_std}`` in ppm:
                       network input ``= (field_ppm - input_mean) / input_std``;
                       ``chi_ppm = output * label_std + label_mean``
  ``voxel_size``       [3] float, mm — the frame the network was trained in
  ``b0_dir``           [3] float — B0 direction in voxel space during training ([0, 0, 1])
  ``units``            ``{"input": "ppm", "output": "ppm"}``
  ``software_version`` str, ``bids_qsmnet.__version__`` that wrote the file
  ``created``          str, ISO 8601 time (UTC)
  ``training``         object, free: data recipe, epochs, command line, seed, ...
  ``inference``        object, optional defaults for inference (e.g. data-consistency lambda)

Loading never executes code: the file is parsed as safetensors only (a header of JSON and raw
tensor bytes), never unpickled.  Everything that is wrong with a file ends in a
:class:`ModelFileError` that names it.  Importing this module does not import torch.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..__about__ import __version__
from ..errors import UserError
from ..io.atomic import atomic_output

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "MODEL_FILENAME",
    "DEFAULT_MODEL_NAME",
    "ModelFileError",
    "Normalization",
    "ModelSpec",
    "LoadedModel",
    "save_model",
    "load_model",
    "read_model_spec",
    "file_sha256",
    "resolve_model",
    "shipped_models_dir",
    "list_shipped_models",
]

LOGGER = logging.getLogger(__name__)

#: Newest model-file format this version reads and the one it writes.
FORMAT_VERSION = 1
#: Key of the JSON spec in the safetensors metadata.
METADATA_KEY = "bids_qsmnet"
#: File name looked for when a model path is a directory.
MODEL_FILENAME = "model.safetensors"
#: Name of the shipped model used when none is given.
DEFAULT_MODEL_NAME = "default"
#: Architecture keys a spec must carry (the others have defaults in ``UNet3d``).
REQUIRED_ARCHITECTURE_KEYS = ("in_channels", "out_channels", "channels", "kernel_size", "act")

# A safetensors header is JSON; anything claiming more than this is not one of our files.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class ModelFileError(UserError, ValueError):
    """A model file (or model name) that cannot be used; the message names the file."""


# --------------------------------------------------------------------------- the spec


def _finite_floats(name: str, values, n: int) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {n} numbers, got {values!r}") from None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be {n} finite numbers, got {values!r}")
    return out


@dataclass(frozen=True)
class Normalization:
    """Standardisation of the network's input and output (all values in ppm).

    ``net_input = (field_ppm - input_mean) / input_std`` and
    ``chi_ppm = net_output * label_std + label_mean``.  The methods work on numpy arrays,
    torch tensors and floats alike.
    """

    input_mean: float
    input_std: float
    label_mean: float
    label_std: float

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                v = float(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"normalization.{f.name} must be a number, got {value!r}"
                ) from None
            if not math.isfinite(v):
                raise ValueError(f"normalization.{f.name} must be finite, got {v}")
            if f.name.endswith("_std") and v <= 0:
                raise ValueError(f"normalization.{f.name} must be > 0, got {v}")
            object.__setattr__(self, f.name, v)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Normalization:
        """Build from a mapping with the four keys (extra keys are refused)."""
        if isinstance(values, Normalization):
            return values
        if not isinstance(values, Mapping):
            raise ValueError(f"normalization must be a mapping, got {type(values).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [k for k in names if k not in values]
        extra = sorted(set(values) - set(names))
        if missing or extra:
            raise ValueError(
                f"normalization needs exactly the keys {names}; missing {missing}, extra {extra}"
            )
        return cls(**{k: values[k] for k in names})

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def normalise_input(self, field_ppm):
        """Local field in ppm → network input."""
        return (field_ppm - self.input_mean) / self.input_std

    def denormalise_input(self, x):
        """Network input → local field in ppm."""
        return x * self.input_std + self.input_mean

    def normalise_label(self, chi_ppm):
        """χ in ppm → network output scale."""
        return (chi_ppm - self.label_mean) / self.label_std

    def denormalise_label(self, y):
        """Network output → χ in ppm."""
        return y * self.label_std + self.label_mean


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _json_copy(name: str, value) -> Any:
    """Deep copy through strict JSON, so a spec holds only what the file can hold."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be JSON-serialisable (finite numbers): {exc}") from None


@dataclass
class ModelSpec:
    """Everything a model file says about its network besides the weights.

    Parameters
    ----------
    name : str — the model's name (e.g. ``default``, ``qsmnet+-synthetic``)
    architecture : dict — :class:`UNet3d` config (``network.config``)
    normalization : Normalization or mapping — ppm statistics, see :class:`Normalization`
    voxel_size : (3,) float — mm, the voxel size of the training frame
    b0_dir : (3,) float — B0 direction in voxel space of the training frame
    units : dict — ``{"input": "ppm", "output": "ppm"}`` (the only units of format 1)
    software_version : str — version of bids_qsmnet that wrote the file
    created : str — ISO 8601 creation time
    training : dict — free JSON: data recipe, epochs, command line, seed, losses...
    inference : dict — optional JSON defaults for inference (e.g. ``{"dc_lambda": 0.05}``)
    format_version : int — model-file format (:data:`FORMAT_VERSION`)

    Raises ``ValueError`` on construction if a field is invalid.
    """

    name: str
    architecture: dict[str, Any]
    normalization: Normalization
    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0)
    b0_dir: tuple[float, float, float] = (0.0, 0.0, 1.0)
    units: dict[str, str] = field(default_factory=lambda: {"input": "ppm", "output": "ppm"})
    software_version: str = __version__
    created: str = field(default_factory=_utc_now)
    training: dict[str, Any] = field(default_factory=dict)
    inference: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        fv = self.format_version
        if isinstance(fv, bool) or not isinstance(fv, int) or fv < 1:
            raise ValueError(f"format_version must be a positive integer, got {fv!r}")
        if fv > FORMAT_VERSION:
            raise ValueError(
                f"format_version {fv} is newer than this bids_qsmnet ({__version__}) supports "
                f"({FORMAT_VERSION}); upgrade bids_qsmnet"
            )
        if not isinstance(self.architecture, Mapping):
            raise ValueError("architecture must be a mapping of UNet3d options")
        missing = [k for k in REQUIRED_ARCHITECTURE_KEYS if k not in self.architecture]
        if missing:
            raise ValueError(f"architecture lacks the key(s) {missing}")
        self.architecture = _json_copy("architecture", dict(self.architecture))
        self.normalization = Normalization.from_mapping(self.normalization)
        vs = _finite_floats("voxel_size", self.voxel_size, 3)
        if min(vs) <= 0:
            raise ValueError(f"voxel_size must be positive (mm), got {self.voxel_size!r}")
        self.voxel_size = vs
        b0 = _finite_floats("b0_dir", self.b0_dir, 3)
        if not any(b0):
            raise ValueError("b0_dir must not be the zero vector")
        self.b0_dir = b0
        if not isinstance(self.units, Mapping) or dict(self.units) != {
            "input": "ppm",
            "output": "ppm",
        }:
            raise ValueError(
                f"units must be {{'input': 'ppm', 'output': 'ppm'}} in format {FORMAT_VERSION}, "
                f"got {self.units!r}"
            )
        self.units = dict(self.units)
        for name in ("software_version", "created"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("training", "inference"):
            value = getattr(self, name)
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise ValueError(f"{name} must be a mapping, got {type(value).__name__}")
            setattr(self, name, _json_copy(name, dict(value)))
        _check_inference_defaults(self.inference)

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON types (the content of the file's metadata)."""
        return {
            "format_version": self.format_version,
            "name": self.name,
            "architecture": copy.deepcopy(self.architecture),
            "normalization": self.normalization.to_dict(),
            "voxel_size": list(self.voxel_size),
            "b0_dir": list(self.b0_dir),
            "units": dict(self.units),
            "software_version": self.software_version,
            "created": self.created,
            "training": copy.deepcopy(self.training),
            "inference": copy.deepcopy(self.inference),
        }

    def to_json(self) -> str:
        """Strict, deterministic JSON (sorted keys, no NaN)."""
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Build from :meth:`to_dict` output; unknown keys are logged and ignored."""
        if not isinstance(data, Mapping):
            raise ValueError(f"the spec must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            LOGGER.warning("ignoring unknown model-spec key(s): %s", ", ".join(unknown))
        required = ("format_version", "name", "architecture", "normalization")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"the spec lacks the key(s) {missing}")
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        """Parse strict JSON (``NaN``/``Infinity`` refused) and build the spec."""

        def _refuse(token):
            raise ValueError(f"non-finite number {token} in the spec")

        try:
            data = json.loads(text, parse_constant=_refuse)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the spec is not valid JSON: {exc}") from None
        return cls.from_dict(data)


@dataclass
class LoadedModel:
    """A network read from a model file.

    Attributes
    ----------
    network : UNet3d — in eval mode, on the requested device
    spec : ModelSpec
    sha256 : str — hex digest of the file's bytes
    path : Path — the file read (resolved)
    """

    network: Any
    spec: ModelSpec
    sha256: str
    path: Path


# --------------------------------------------------------------------------- file helpers


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_path(path: str | os.PathLike) -> Path:
    """The model file behind ``path``: the file itself, or a directory's model file."""
    p = Path(path).expanduser()
    if p.is_dir():
        candidate = p / MODEL_FILENAME
        if candidate.is_file():
            return candidate
        found = sorted(q for q in p.glob("*.safetensors") if q.is_file())
        if len(found) == 1:
            return found[0]
        raise ModelFileError(
            f"model directory {p} must contain {MODEL_FILENAME} (or exactly one .safetensors "
            f"file); found {[q.name for q in found] or 'none'}"
        )
    if not p.exists():
        raise ModelFileError(f"model file {p} does not exist")
    if not p.is_file():
        raise ModelFileError(f"model path {p} is not a regular file")
    return p


def _read_header(path: Path) -> dict[str, Any]:
    """Parse and check the safetensors header of ``path`` without reading the tensors."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise ModelFileError(f"{path} is not a safetensors model file (only {size} bytes)")
        n = int.from_bytes(prefix, "little")
        if n < 2 or n > min(size - 8, _MAX_HEADER_BYTES):
            raise ModelFileError(
                f"{path} is not a safetensors model file (bad header length {n} for a file of "
                f"{size} bytes; a pickle or torch.save checkpoint is not accepted)"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path} is not a safetensors model file (header: {exc})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path} is not a safetensors model file (header is not an object)")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, stop = (int(v) for v in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise ModelFileError(f"{path} is corrupt: tensor {key!r} has no data offsets") from None
        if not 0 <= start <= stop:
            raise ModelFileError(f"{path} is corrupt: tensor {key!r} has bad data offsets")
        end = max(end, stop)
    if 8 + n + end > size:
        raise ModelFileError(
            f"{path} is truncated: its header describes {8 + n + end} bytes, the file has {size}"
        )
    if 8 + n + end < size:
        raise ModelFileError(f"{path} is corrupt: {size - 8 - n - end} bytes after the tensors")
    return header


#: inference defaults the app reads from a model file, and what each must be
_INFERENCE_NUMBERS = ("dc_lambda", "dc_edge_mm", "dc_highpass_mm", "dc_tv")


def _check_inference_defaults(inference: Mapping[str, Any]) -> None:
    """Refuse inference defaults the app would fail on later, at inference (so that the error
    can name the model file): non-negative numbers, non-negative iteration and pass counts, a
    positive TV penalty scale,
    a ``dc_auto`` rule of numbers, and flip axes among the volume axes 0, 1, 2."""
    for key in _INFERENCE_NUMBERS:
        if key in inference:
            v = inference[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"inference.{key} must be a non-negative number, got {v!r}")
    for key in ("dc_iterations", "dc_tv_iterations", "residual_passes"):
        if key in inference:
            v = inference[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"inference.{key} must be a non-negative integer, got {v!r}")
    if "dc_tv_penalty_scale" in inference:
        v = inference["dc_tv_penalty_scale"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"inference.dc_tv_penalty_scale must be a positive number, "
                             f"got {v!r}")
    if "dc_auto" in inference:
        from ..physics.dc_path import AutoLambda

        v = inference["dc_auto"]
        if not isinstance(v, Mapping):
            raise ValueError(f"inference.dc_auto must be an object, got {v!r}")
        try:
            AutoLambda.from_dict(v)
        except ValueError as exc:
            raise ValueError(f"inference.{exc}") from None
    if "flip_axes" in inference:
        v = inference["flip_axes"]
        if not isinstance(v, list) or any(isinstance(a, bool) or a not in (0, 1, 2) for a in v):
            raise ValueError(f"inference.flip_axes must be a list of volume axes 0, 1, 2, "
                             f"got {v!r}")


def _spec_from_header(path: Path, header: Mapping[str, Any]) -> ModelSpec:
    metadata = header.get("__metadata__") or {}
    text = metadata.get(METADATA_KEY) if isinstance(metadata, Mapping) else None
    if not isinstance(text, str):
        raise ModelFileError(
            f"{path} is a safetensors file but not a bids_qsmnet model: its metadata has no "
            f"{METADATA_KEY!r} entry"
        )
    try:
        version = json.loads(text).get("format_version")
    except (json.JSONDecodeError, AttributeError):
        version = None
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has model-file format_version {version}, newer than the {FORMAT_VERSION} "
            f"that bids_qsmnet {__version__} reads; upgrade bids_qsmnet"
        )
    try:
        return ModelSpec.from_json(text)
    except (ValueError, TypeError) as exc:
        raise ModelFileError(f"{path} has an invalid model spec: {exc}") from None


def read_model_spec(path: str | os.PathLike) -> ModelSpec:
    """Read and validate only the spec of a model file (no torch, no tensors)."""
    p = _model_path(path)
    return _spec_from_header(p, _read_header(p))


def _unwrap(network):
    # torch.compile keeps the module in _orig_mod; DataParallel/DDP in .module.
    for attr in ("_orig_mod", "module"):
        inner = getattr(network, attr, None)
        if inner is not None and hasattr(inner, "state_dict"):
            network = inner
    return network


# --------------------------------------------------------------------------- save and load


def save_model(path: str | os.PathLike, network, spec: ModelSpec) -> Path:
    """Write ``network``'s weights and ``spec`` to a model file, atomically.

    The file is written to a temporary name in the destination directory and moved into place
    with ``os.replace``, so readers never see a half-written model.

    Parameters
    ----------
    path : path — destination file (``.safetensors``), or an existing directory, in which
        :data:`MODEL_FILENAME` is written
    network : UNet3d — its ``config`` must equal ``spec.architecture``
    spec : ModelSpec

    Returns
    -------
    path : Path — the file written
    """
    import torch
    from safetensors.torch import save_file

    from .unet import check_unet_config

    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec, got {type(spec).__name__}")
    network = _unwrap(network)
    config = getattr(network, "config", None)
    if config is None:
        raise ValueError("network has no config; save a bids_qsmnet UNet3d")
    try:
        arch = check_unet_config(**spec.architecture)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"spec.architecture is not a valid UNet3d config: {exc}") from None
    if arch != config:
        raise ValueError(
            f"spec.architecture {spec.architecture} does not match the network's config {config}"
        )
    tensors = {}
    for key, value in network.state_dict().items():
        t = value.detach().to("cpu")
        t = t.to(torch.float32) if t.is_floating_point() else t.to(torch.int64)
        tensors[key] = t.contiguous().clone()
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"refusing to save non-finite values in {key}")
    metadata = {METADATA_KEY: spec.to_json()}

    dest = Path(path).expanduser()
    if dest.is_dir():
        dest = dest / MODEL_FILENAME
    # flushed to disk before the rename makes it visible
    with atomic_output(dest, fsync=True) as tmp:
        save_file(tensors, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600; a model file is shareable
    LOGGER.info("wrote model %r to %s", spec.name, dest)
    return dest


def load_model(path: str | os.PathLike, *, device="cpu") -> LoadedModel:
    """Read a model file (or a directory holding one) and build its network.

    Parameters
    ----------
    path : path — a ``.safetensors`` model file, or a directory with :data:`MODEL_FILENAME`
    device : str or torch.device — where to put the network

    Returns
    -------
    LoadedModel — the network in eval mode on ``device``, its spec, the file's sha256, the path

    Raises
    ------
    ModelFileError
        naming the file, if it does not exist, is not a safetensors file (a pickle is never
        unpickled), is truncated or corrupt, lacks the bids_qsmnet metadata, has a newer
        format_version, an invalid spec (architecture, normalisation...), or tensors whose
        keys, shapes or values do not fit the architecture.
    """
    import torch
    from safetensors import SafetensorError, safe_open

    from .unet import UNet3d

    p = _model_path(path).resolve()
    header = _read_header(p)
    spec = _spec_from_header(p, header)
    try:
        network = UNet3d(**spec.architecture)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{p} has an invalid architecture: {exc}") from None

    expected = network.state_dict()
    present = set(header) - {"__metadata__"}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing or unexpected:
        raise ModelFileError(
            f"{p}: tensors do not match the architecture; missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}"
        )
    for key, ref in expected.items():
        shape = tuple(header[key].get("shape", ()))
        if shape != tuple(ref.shape):
            raise ModelFileError(
                f"{p}: tensor {key} has shape {shape}, the architecture needs {tuple(ref.shape)}"
            )

    state = {}
    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            for key, ref in expected.items():
                t = fh.get_tensor(key)
                if t.is_floating_point() != ref.is_floating_point():
                    raise ModelFileError(f"{p}: tensor {key} has dtype {t.dtype}, need {ref.dtype}")
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ModelFileError(f"{p}: tensor {key} holds non-finite values")
                state[key] = t.to(ref.dtype)
    except SafetensorError as exc:
        raise ModelFileError(f"{p} is not a readable safetensors file: {exc}") from None
    network.load_state_dict(state, strict=True)
    network.to(device).eval()
    sha = file_sha256(p)
    LOGGER.info("loaded model %r from %s (sha256 %s)", spec.name, p, sha)
    return LoadedModel(network=network, spec=spec, sha256=sha, path=p)


# --------------------------------------------------------------------------- shipped models


def shipped_models_dir() -> Path:
    """Folder of the models shipped inside the package (``bids_qsmnet/resources/models``)."""
    return Path(__file__).resolve().parent.parent / "resources" / "models"


def list_shipped_models() -> list[str]:
    """Names of the shipped models (file stems in :func:`shipped_models_dir`), sorted."""
    d = shipped_models_dir()
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.safetensors") if p.is_file())


def resolve_model(name_or_path: str | os.PathLike | None = None) -> Path:
    """Turn a model name or path into the path of a model file (without loading it).

    Parameters
    ----------
    name_or_path : str, path or None — an existing file or directory (see :func:`load_model`),
        or the name of a shipped model (``bids_qsmnet/resources/models/<name>.safetensors``);
        ``None`` means :data:`DEFAULT_MODEL_NAME`

    Returns
    -------
    path : Path — resolved, absolute

    Raises
    ------
    ModelFileError
        if neither a file nor a shipped model of that name exists (the message lists the
        shipped names).
    """
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL_NAME
    p = Path(name_or_path).expanduser()
    if p.exists():
        return _model_path(p).resolve()
    name = str(name_or_path)
    shipped = shipped_models_dir() / f"{name}.safetensors"
    if os.sep not in name and "/" not in name and shipped.is_file():
        return shipped.resolve()
    known = list_shipped_models()
    listing = ", ".join(known) if known else "none"
    if name == DEFAULT_MODEL_NAME:
        raise ModelFileError(
            f"no default model is shipped with this installation of bids_qsmnet {__version__} "
            f"(looked for {shipped}); pass a model file path instead (shipped models: {listing})"
        )
    if name.endswith(".safetensors") or os.sep in name or "/" in name:
        raise ModelFileError(f"model file {p} does not exist")
    raise ModelFileError(
        f"{name!r} is neither an existing model file nor a shipped model name "
        f"(shipped models: {listing})"
    )

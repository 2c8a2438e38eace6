"""dlib's face-recognition ResNet (`dlib_face_recognition_resnet_model_v1.dat`) as a PyTorch module, read from
dlib's own serialised file by a strict numpy reader; and the differentiable 5-point warp to its 150 x 150 chip.

The network is the `anet_type` of dlib's examples/dnn_face_recognition_ex.cpp: a 7 x 7 / 2 convolution (32),
affine, relu, 3 x 3 / 2 max pool, then residual units (two 3 x 3 convolutions, each followed by an affine
layer, which the file stores either as such or as batch norm that dlib converts to an affine on load): three of
32 filters, a downsampling unit and three of 64, a downsampling unit and two of 128, of 256, one downsampling
unit of 256; a global average pool and a 128 x 256 linear map without bias. dlib's details this mirrors:
a strided convolution or pool has no padding (padding defaults to size / 2 only for stride 1), so 150 px
gives 72, 35, 17, 8, 3 and 1 px; a downsampling unit adds its branch to a 2 x 2 / 2 average pool of its input,
and dlib's add_prev zero-pads the smaller tensor at the end of each axis (the extra channels, and the 3 x 3
branch against the 4 x 4 pool at the 8 px level).

File format (dlib/serialize.h, dlib/dnn/core.h, dlib/cuda/tensor.h): an integer is a control byte (bit 7 the
sign, bits 0-3 the count n of little-endian magnitude bytes that follow, bits 4-6 zero) then n bytes; a float
is an integer mantissa and an integer exponent (value = m 2^e); a bool is the character '0' or '1'; a string
is its length then its bytes; a tensor is version 2, four sizes, then the values as float32 little endian.
The loss layer writes its version, its details and then its subnetwork; every layer writes its version and
then its subnetwork before its own details, so all versions come first (output to input) and the layers'
details follow from the input layer up.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CHIP_SIZE = 150
EMBEDDING_SIZE = 128
MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"
MEAN_RGB = (122.782, 117.001, 104.298)  # input_rgb_image's defaults, checked against the file's

# Deng et al.'s five points (eye centres, nose tip, mouth corners; image left first) in dlib's 150 px chip with
# compute_face_descriptor's padding 0.25: the means of points 36-41 and 42-47, points 30, 48 and 54 of dlib's
# mean face (get_face_chip_details, dlib/image_transforms/interpolation.h), in its unit square, mapped by
# (padding + p) / (1 + 2 padding) x 150. dlib aligns on 32 of the 68 points; these 5 give nearly the same chip.
_FIVE_UNIT = np.array([[0.2254918, 0.2159903], [0.7547613, 0.2159903], [0.490127, 0.515625],
                       [0.254149, 0.780233], [0.726104, 0.780233]])
DLIB_PADDING = 0.25
DLIB_TEMPLATE_PX = (DLIB_PADDING + _FIVE_UNIT) / (1 + 2 * DLIB_PADDING) * CHIP_SIZE

# (filters, units, downsampling first unit) per level, input to output (alevel4 .. alevel0)
_LEVELS = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))


class DlibFormatError(ValueError):
    """The file is not dlib's face-recognition ResNet (wrong, truncated or corrupt)."""


class _Reader:
    """Sequential reader of dlib's serialisation primitives over a bytes buffer; every read names the field and
    its offset in the error it raises."""

    def __init__(self, data: bytes, source: str):
        self.data, self.pos, self.source = data, 0, source

    def fail(self, what: str) -> DlibFormatError:
        return DlibFormatError(f"{self.source}: not dlib's face-recognition ResNet: {what} (byte {self.pos} of "
                               f"{len(self.data)})")

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail(f"file ends inside {what} (truncated?)")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def int(self, what: str) -> int:
        control = self.take(1, what)[0]
        n = control & 0x0F
        if control & 0x70 or not 1 <= n <= 8:
            raise self.fail(f"bad integer control byte 0x{control:02x} in {what}")
        value = int.from_bytes(self.take(n, what), "little")
        return -value if control & 0x80 else value

    def float(self, what: str) -> float:
        mantissa, exponent = self.int(what), self.int(what)
        if exponent >= 32000:  # float_details' markers of inf (32000), -inf (32001) and nan (32002)
            return {32000: np.inf, 32001: -np.inf, 32002: np.nan}.get(exponent, np.nan)
        return float(np.ldexp(float(mantissa), exponent))

    def bool(self, what: str) -> bool:
        ch = self.take(1, what)
        if ch not in (b"0", b"1"):
            raise self.fail(f"bad bool {ch!r} in {what}")
        return ch == b"1"

    def string(self, what: str) -> str:
        n = self.int(what)
        if not 0 <= n <= 64:  # dlib's version tags are short; a long one means we are out of step
            raise self.fail(f"implausible string length {n} in {what}")
        return self.take(n, what).decode("latin-1")

    def tag(self, expected: tuple[str, ...], what: str) -> str:
        found = self.string(what)
        if found not in expected:
            raise self.fail(f"expected {' or '.join(map(repr, expected))} for {what}, found {found!r}")
        return found

    def version(self, allowed: tuple[int, ...], what: str) -> int:
        found = self.int(f"{what} version")
        if found not in allowed:
            raise self.fail(f"unexpected {what} version {found}, expected one of {allowed}")
        return found

    def tensor(self, what: str) -> np.ndarray:
        self.version((2,), f"{what} tensor")
        shape = tuple(self.int(f"{what} size") for _ in range(4))
        if any(s < 0 for s in shape) or int(np.prod(shape)) > len(self.data):
            raise self.fail(f"implausible tensor shape {shape} in {what}")
        raw = self.take(4 * int(np.prod(shape)), f"{what} values")
        return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)

    def alias(self, what: str) -> tuple[int, ...]:
        self.version((1,), f"{what} alias_tensor")
        return tuple(self.int(f"{what} size") for _ in range(4))


@dataclass(frozen=True)
class _Op:
    """One dlib layer, input to output: kind in con, affine, relu, max_pool, avg_pool, add_prev, fc, tag,
    skip; `a` the filters / outputs / window / tag id, `b` the stride (con and pools), `k` con's kernel."""
    kind: str
    a: int = 0
    b: int = 0
    k: int = 0  # con: kernel size


def _architecture() -> list[_Op]:
    ops = [_Op("con", 32, 2, 7), _Op("affine"), _Op("relu"), _Op("max_pool", 3, 2)]
    for filters, units, down in _LEVELS:
        for unit in range(units):
            stride = 2 if down and unit == 0 else 1
            block = [_Op("tag", 1), _Op("con", filters, stride, 3), _Op("affine"), _Op("relu"),
                     _Op("con", filters, 1, 3), _Op("affine")]
            if stride == 2:  # residual_down: add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<tag1>>>>>
                block += [_Op("tag", 2), _Op("skip", 1), _Op("avg_pool", 2, 2), _Op("add_prev", 2)]
            else:  # residual: add_prev1<block<tag1>>
                block += [_Op("add_prev", 1)]
            ops += block + [_Op("relu")]
    return ops + [_Op("avg_pool", 0, 1), _Op("fc", EMBEDDING_SIZE)]


ARCHITECTURE = _architecture()


def _read_layer(r: _Reader, op: _Op, where: str, in_channels: int) -> tuple[str, dict]:
    """Read one layer's details; returns (kind, arrays) for the layers with weights."""
    if op.kind == "con":
        version = r.tag(("con_4", "con_5", "con_6"), where)
        params = r.tensor(f"{where} params")
        filters, nr, nc = r.int(where), r.int(where), r.int(where)
        stride, pad = (r.int(where), r.int(where)), (r.int(where), r.int(where))
        f_shape, b_shape = r.alias(f"{where} filters"), r.alias(f"{where} biases")
        for _ in range(4):
            r.float(f"{where} learning-rate multipliers")
        use_bias = r.bool(where) if version in ("con_5", "con_6") else True
        if version == "con_6":
            r.bool(where)
        expected = (op.a, op.k, op.k, (op.b, op.b), (op.k // 2 if op.b == 1 else 0,) * 2)  # dlib's padding rule
        if (filters, nr, nc, stride, pad) != expected:
            raise r.fail(f"{where}: convolution (filters, rows, cols, stride, padding) = "
                         f"{(filters, nr, nc, stride, pad)}, expected {expected}")
        w_size = filters * in_channels * nr * nc
        if f_shape != (filters, in_channels, nr, nc) or params.size != w_size + (filters if use_bias else 0):
            raise r.fail(f"{where}: filters {f_shape}, {params.size} parameters for {in_channels} input channels")
        flat = params.reshape(-1)
        bias = flat[w_size:] if use_bias else np.zeros(filters, np.float32)
        return "con", {"weight": flat[:w_size].reshape(f_shape), "bias": bias}
    if op.kind == "affine":
        version = r.tag(("affine_", "affine_2", "bn_con2"), where)
        params = r.tensor(f"{where} params")
        gamma_shape, _ = r.alias(f"{where} gamma"), r.alias(f"{where} beta")
        k = int(np.prod(gamma_shape))
        if gamma_shape != (1, in_channels, 1, 1) or params.size != 2 * k:
            raise r.fail(f"{where}: affine of shape {gamma_shape} with {params.size} parameters, expected "
                         f"{in_channels} channels")
        gamma, beta = params.reshape(-1)[:k], params.reshape(-1)[k:]
        if version == "bn_con2":  # batch norm: dlib converts it to gamma / sqrt(var + eps), beta - mean x that
            _, _ = r.tensor(f"{where} means"), r.tensor(f"{where} invstds")
            mean, var = r.tensor(f"{where} running means").reshape(-1), r.tensor(f"{where} variances").reshape(-1)
            r.int(where), r.int(where)
            for _ in range(4):
                r.float(f"{where} learning-rate multipliers")
            eps = r.float(f"{where} eps")
            if mean.size != k or var.size != k:
                raise r.fail(f"{where}: batch-norm statistics of {mean.size} channels, expected {k}")
            gamma = (gamma / np.sqrt(var.astype(np.float64) + eps)).astype(np.float32)
            beta = (beta - gamma * mean).astype(np.float32)
        else:
            mode = r.int(where)
            if mode != 0:  # CONV_MODE (0): one scale and shift per channel
                raise r.fail(f"{where}: affine layer in mode {mode}, expected 0 (per channel)")
            if version == "affine_2" and r.bool(where):
                raise r.fail(f"{where}: disabled affine layer")
        return "affine", {"scale": gamma, "shift": beta}
    if op.kind == "relu":
        if r.tag(("relu_", "relu_2"), where) == "relu_2" and r.bool(where):
            raise r.fail(f"{where}: disabled relu")
        return "relu", {}
    if op.kind in ("max_pool", "avg_pool"):
        r.tag((f"{op.kind}_2",), where)
        found = tuple(r.int(where) for _ in range(6))
        if found != (op.a, op.a, op.b, op.b, 0, 0):
            raise r.fail(f"{where}: {op.kind} (nr, nc, stride y, x, padding y, x) = {found}, expected "
                         f"{(op.a, op.a, op.b, op.b, 0, 0)}")
        return op.kind, {}
    if op.kind == "add_prev":
        r.tag(("add_prev_",), where)
        return "add_prev", {}
    if op.kind == "fc":
        version = r.tag(("fc_2", "fc_3"), where)
        outputs, inputs = r.int(where), r.int(where)
        params = r.tensor(f"{where} params")
        r.alias(f"{where} weights"), r.alias(f"{where} biases")
        bias_mode = r.int(where)
        for _ in range(4):
            r.float(f"{where} learning-rate multipliers")
        if version == "fc_3":
            r.bool(where)
        if (outputs, inputs, bias_mode) != (op.a, in_channels, 1) or params.shape[:2] != (inputs, outputs):
            raise r.fail(f"{where}: fc {inputs} -> {outputs} (bias mode {bias_mode}, params {params.shape}), "
                         f"expected {in_channels} -> {op.a} without bias")
        return "fc", {"weight": params.reshape(inputs, outputs).T.copy()}  # dlib computes x @ W
    raise AssertionError(op.kind)


def read_dlib_resnet(path: str | Path) -> list[tuple[str, dict[str, np.ndarray]]]:
    """The weights of dlib's face-recognition ResNet, input to output: [(kind, {name: float32 array})] for each
    layer with weights (con: weight (O, I, k, k), bias (O,); affine: scale, shift (C,); fc: weight (128, 256)).

    Checks every version tag, layer type, filter count, kernel, stride, padding and tensor size against
    ARCHITECTURE and that the file ends where the network does. Raises FileNotFoundError for a missing file
    and DlibFormatError (a ValueError) naming the field and byte offset for anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dlib model not found: {path}")
    r = _Reader(path.read_bytes(), str(path))
    r.version((1,), "loss layer")
    if r.tag(("loss_metric_", "loss_metric_2"), "loss layer") == "loss_metric_2":
        r.float("loss margin"), r.float("loss distance threshold")
    top_down = ARCHITECTURE[::-1]
    computational = [op for op in top_down if op.kind not in ("tag", "skip")]
    layer_versions = []
    for op in top_down:
        if op.kind in ("tag", "skip"):
            r.version((1,), f"{op.kind} layer")
        else:  # the layer on the input has versions 2-3, the others 1-2
            on_input = op is computational[-1]
            layer_versions.append(r.version((2, 3) if on_input else (1, 2), f"{op.kind} layer"))
    r.tag(("input_rgb_image_sized",), "input layer")
    mean = tuple(r.float("input mean") for _ in range(3))
    if not np.allclose(mean, MEAN_RGB, atol=1e-3) or (r.int("input rows"), r.int("input cols")) != (CHIP_SIZE,) * 2:
        raise r.fail(f"input layer: mean {mean} or size is not input_rgb_image_sized<{CHIP_SIZE}>'s")
    layers, channels = [], 3
    for i, (op, version) in enumerate(zip(computational[::-1], layer_versions[::-1])):
        where = f"layer {i + 1}"
        kind, arrays = _read_layer(r, op, where, channels)
        channels = op.a if op.kind in ("con", "fc") else channels
        for flag in ("setup", "stale", "disabled"):
            r.bool(f"{where} {flag} flag")
        r.tensor(f"{where} x_grad"), r.tensor(f"{where} cached output")
        if i == 0:
            r.tensor(f"{where} final gradient")
            if version == 3:
                r.int(f"{where} sample expansion factor")
        elif version == 2:
            r.tensor(f"{where} parameter gradient")
        if arrays:
            if not all(np.isfinite(a).all() for a in arrays.values()):
                raise r.fail(f"{where}: non-finite weights")
            layers.append((kind, arrays))
    if r.pos != len(r.data):
        raise r.fail(f"{len(r.data) - r.pos} bytes after the network")
    return layers


def dlib_model_path() -> Path:
    """The .dat file shipped by the PyPI package face_recognition_models (located, not imported: its __init__
    needs pkg_resources). Raises FileNotFoundError without it."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("dlib's face-recognition model needs the package face_recognition_models "
                                "(pip install face_recognition_models)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"dlib's face-recognition model not found: {path}")
    return path


def _pad_to(x: torch.Tensor, channels: int, rows: int, cols: int) -> torch.Tensor:
    # dlib's add_prev: the smaller tensor is zero beyond its own extent (end of each axis)
    return F.pad(x, (0, cols - x.shape[3], 0, rows - x.shape[2], 0, channels - x.shape[1]))


class _Affine(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("shift", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale[:, None, None] + self.shift[:, None, None]


class _Unit(nn.Module):
    """relu(conv-affine-relu-conv-affine(x) + shortcut(x)); shortcut x, or a 2 x 2 / 2 average pool."""

    def __init__(self, in_channels: int, filters: int, down: bool):
        super().__init__()
        stride = 2 if down else 1
        self.down = down
        self.conv_a = nn.Conv2d(in_channels, filters, 3, stride, 0 if down else 1)
        self.affine_a = _Affine(filters)
        self.conv_b = nn.Conv2d(filters, filters, 3, 1, 1)
        self.affine_b = _Affine(filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.affine_b(self.conv_b(F.relu(self.affine_a(self.conv_a(x)))))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        size = [max(a, b) for a, b in zip(branch.shape[1:], shortcut.shape[1:])]
        return F.relu(_pad_to(branch, *size) + _pad_to(shortcut, *size))


class DlibFaceResNet(nn.Module):
    """dlib's face-recognition ResNet.

    forward(chip): chip (B, 3, 150, 150) float RGB in [0, 1] (uint8 / 255), aligned as dlib's face chips
    (get_face_chip(img, shape, 150, 0.25), or warp_to_dlib_chip) -> (B, 128) descriptors exactly as dlib's
    compute_face_descriptor returns them: not normalised; dlib calls two faces the same person below a
    Euclidean distance of 0.6. The input is taken to 0..255 and centred as input_rgb_image does,
    (255 x - mean) / 256 per channel. Frozen in eval mode by load_dlib_resnet; differentiable in its input.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 7, 2, 0)
        self.affine1 = _Affine(32)
        units, channels = [], 32
        for filters, count, down in _LEVELS:
            for unit in range(count):
                units.append(_Unit(channels, filters, down and unit == 0))
                channels = filters
        self.units = nn.ModuleList(units)
        self.fc = nn.Linear(channels, EMBEDDING_SIZE, bias=False)
        self.register_buffer("mean_rgb", torch.tensor(MEAN_RGB))

    def forward(self, chip: torch.Tensor) -> torch.Tensor:
        if chip.ndim != 4 or chip.shape[1:] != (3, CHIP_SIZE, CHIP_SIZE) or not chip.is_floating_point():
            raise ValueError(f"chip: expected a float (B, 3, {CHIP_SIZE}, {CHIP_SIZE}) tensor, "
                             f"got {chip.dtype} {tuple(chip.shape)}")
        x = (chip * 255.0 - self.mean_rgb.to(chip.dtype)[:, None, None]) / 256.0
        x = F.max_pool2d(F.relu(self.affine1(self.conv1(x))), 3, 2)
        for unit in self.units:
            x = unit(x)
        return self.fc(x.mean(dim=(2, 3)))

    def weighted_layers(self) -> list[tuple[str, nn.Module]]:
        """(kind, module) of every layer with weights, input to output, in the file's order."""
        out = [("con", self.conv1), ("affine", self.affine1)]
        for u in self.units:
            out += [("con", u.conv_a), ("affine", u.affine_a), ("con", u.conv_b), ("affine", u.affine_b)]
        return out + [("fc", self.fc)]


def load_dlib_resnet(path: str | Path | None = None, device: torch.device | str = "cpu") -> DlibFaceResNet:
    """The frozen network from dlib's .dat (default: face_recognition_models' copy, dlib_model_path()).

    Returns it on `device` in eval mode with requires_grad False on every parameter (gradients still flow to
    its input). Raises FileNotFoundError for a missing file, DlibFormatError for a wrong or corrupt one.
    """
    path = dlib_model_path() if path is None else Path(path)
    layers = read_dlib_resnet(path)
    net = DlibFaceResNet()
    modules = net.weighted_layers()
    if [k for k, _ in layers] != [k for k, _ in modules]:  # read_dlib_resnet checked the file's layer list
        raise DlibFormatError(f"{path}: layer kinds differ from the network's")
    with torch.no_grad():
        for (_, arrays), (_, module) in zip(layers, modules):
            for name, value in arrays.items():
                target = getattr(module, name)
                if tuple(target.shape) != value.shape:
                    raise DlibFormatError(f"{path}: {name} of shape {value.shape}, network {tuple(target.shape)}")
                target.copy_(torch.from_numpy(value))
    net.requires_grad_(False)
    return net.to(device).eval()

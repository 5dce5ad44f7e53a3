"""Convolutions through cuDNN (``runtime/cudnn_conv.py``) and their fallback.

Without a GPU, :class:`FakeFrontend` stands in for NVIDIA's cuDNN frontend: it
keeps the graph that onnxgrad builds (tensors, dims, strides, pads, strides,
dilations, the roles of the operands) and, on ``execute``, reads and writes the
operands at the device addresses it is given, computing each convolution with
onnxgrad's own NumPy kernels from what the graph says.  So a convolution run
"through cuDNN" equals the same op run directly only if the graph describes
it correctly, which these tests check over 1-D, 2-D and 3-D shapes, groups,
strides, dilations and asymmetric pads.  The ``gpu`` test at the end runs the
real library against the CPU.
"""

from __future__ import annotations

import ctypes
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onnxgrad import cudnn_conv
from onnxgrad.ops import conv
from onnxgrad.tools.cli import main

_DTYPES = {"HALF": np.float16, "FLOAT": np.float32, "DOUBLE": np.float64}


class FakeTensor:
    def __init__(self, dim=None, stride=None, data_type=None, name=""):
        self.dim, self.stride, self.data_type, self.name = dim, stride, data_type, name
        self.output = False

    def set_output(self, value):
        self.output = value
        return self

    def set_dim(self, dim):
        self.dim = list(dim)
        return self

    def set_stride(self, stride):
        self.stride = list(stride)
        return self

    def set_data_type(self, data_type):
        self.data_type = data_type
        return self


class FakeGraph:
    def __init__(self, frontend, io_data_type, intermediate_data_type, compute_data_type, handle):
        self.frontend, self.io, self.handle = frontend, io_data_type, handle
        self.op = None
        self.built = False

    def tensor(self, name, dim, stride, data_type):
        return FakeTensor(list(dim), list(stride), data_type, name)

    def _conv(self, kind, a, b, **attrs):
        assert self.op is None, "one convolution per graph"
        self.op = (kind, a, b, attrs)
        return FakeTensor(data_type=self.io)

    def conv_fprop(self, image, weight, **attrs):
        return self._conv("fprop", image, weight, **attrs)

    def conv_dgrad(self, loss, filter, **attrs):  # noqa: A002 - the frontend's name
        return self._conv("dgrad", loss, filter, **attrs)

    def conv_wgrad(self, image, loss, **attrs):
        return self._conv("wgrad", image, loss, **attrs)

    def build(self, heuristics):
        assert heuristics == ["A", "FALLBACK"]
        kind, a, b, _ = self.op
        if (kind, tuple(a.dim)) in self.frontend.unsupported:
            raise self.frontend.cudnnGraphNotSupportedError("no engine for this convolution")
        self.frontend.builds += 1
        self.built = True

    def get_workspace_size(self):
        return 64

    def execute(self, pack, workspace, handle):
        assert self.built and handle is self.handle and isinstance(workspace, int)
        kind, a, b, attrs = self.op
        (result,) = [t for t in pack if t.output]
        arrays = {t: _at(pack[t], t) for t in pack}
        x, y, out = arrays[a], arrays[b], arrays[result]
        pads = list(attrs["pre_padding"]) + list(attrs["post_padding"])
        geometry = {"pads": pads, "strides": attrs["stride"], "dilations": attrs["dilation"]}
        if kind == "fprop":
            group = x.shape[1] // y.shape[1]
            out[...] = conv.Conv(np, x, y, group=group, **geometry)[0]
        elif kind == "dgrad":
            group = out.shape[1] // y.shape[1]
            out[...] = conv.ConvGradX(np, x, y, out.shape, group=group, **geometry)[0]
        else:
            group = x.shape[1] // out.shape[1]
            out[...] = conv.ConvGradW(np, y, x, out.shape, group=group, **geometry)[0]
        self.frontend.executed.append(kind)


def _at(address: int, tensor: FakeTensor) -> np.ndarray:
    """The array that ``tensor`` describes at ``address`` (host memory in these tests)."""
    dtype = np.dtype(_DTYPES[tensor.data_type])
    assert tensor.stride == cudnn_conv._strides(tensor.dim), "onnxgrad passes packed operands"
    size = int(np.prod(tensor.dim))
    buffer = (ctypes.c_char * (size * dtype.itemsize)).from_address(address)
    return np.frombuffer(buffer, dtype=dtype).reshape(tensor.dim)


class FakeFrontend(types.SimpleNamespace):
    """The parts of the ``cudnn`` module that onnxgrad calls."""

    class cudnnGraphNotSupportedError(RuntimeError):
        pass

    def __init__(self):
        super().__init__(data_type=types.SimpleNamespace(HALF="HALF", FLOAT="FLOAT",
                                                         DOUBLE="DOUBLE"),
                         heur_mode=types.SimpleNamespace(A="A", FALLBACK="FALLBACK"),
                         builds=0, executed=[], streams=[], unsupported=set())

    def pygraph(self, **kwargs):
        return FakeGraph(self, **kwargs)

    def set_stream(self, handle, stream):
        self.streams.append(stream)

    def create_handle(self):
        return object()

    def backend_version_string(self):
        return "9.99.0"


def _engine(frontend):
    return cudnn_conv.Convolutions(
        frontend, frontend.create_handle(),
        address=lambda array: array.__array_interface__["data"][0],
        stream=lambda: 1234, buffer=lambda nbytes: np.empty(nbytes, np.uint8),
        description="cuDNN 9.99.0")


def _module(engine):
    """NumPy's namespace with cuDNN convolutions attached, as the CUDA backend's is."""
    module = types.ModuleType("numpy")
    module.__dict__.update(vars(np))
    module.cudnn_convolutions = engine
    return module


#: (x shape, w shape, attributes)
CASES = [
    ((2, 4, 11), (6, 2, 3), {"group": 2, "pads": [2, 1], "strides": [2]}),
    ((2, 3, 9, 8), (5, 3, 3, 3), {"pads": [1, 0, 2, 1]}),
    ((2, 4, 10, 9), (8, 1, 3, 3), {"group": 4, "strides": [2, 2], "dilations": [1, 2],
                                   "pads": [1, 2, 0, 1]}),
    ((2, 6, 7, 7), (6, 1, 5, 5), {"group": 6, "auto_pad": "SAME_UPPER"}),
    ((1, 2, 5, 6, 4), (3, 2, 3, 2, 1), {"strides": [1, 2, 1], "pads": [1, 0, 0, 1, 1, 0]}),
]


def _run(xp, x, w, dy, attrs):
    return {"Y": conv.Conv(xp, x, w, **attrs)[0],
            "dX": conv.ConvGradX(xp, dy, w, x.shape, **attrs)[0],
            "dW": conv.ConvGradW(xp, dy, x, w.shape, **attrs)[0]}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("x_shape,w_shape,attrs", CASES)
def test_convolutions_through_the_frontend_equal_the_direct_kernels(x_shape, w_shape, attrs,
                                                                     dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    y_shape = conv.Conv(np, x, w, **attrs)[0].shape
    dy = rng.standard_normal(y_shape).astype(dtype)
    want = _run(np, x, w, dy, attrs)
    frontend = FakeFrontend()
    engine = _engine(frontend)
    got = _run(_module(engine), x, w, dy, attrs)
    assert frontend.executed == ["fprop", "dgrad", "wgrad"], "every pass ran on the frontend"
    for name in want:
        assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # the same shapes again: the plans are reused, the stream is bound once
    _run(_module(engine), x, w, dy, attrs)
    assert frontend.builds == 3 and engine.built() == 3
    assert frontend.streams == [1234]


def test_a_declined_convolution_falls_back_and_is_listed():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 8, 8))
    w = rng.standard_normal((4, 3, 3, 3))
    dy = rng.standard_normal((2, 4, 6, 6))
    frontend = FakeFrontend()
    frontend.unsupported.add(("fprop", (2, 3, 8, 8)))
    engine = _engine(frontend)
    got = _run(_module(engine), x, w, dy, {})
    want = _run(np, x, w, dy, {})
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert frontend.executed == ["dgrad", "wgrad"]
    assert list(engine.declined) == ["forward float64 X 2x3x8x8 W 4x3x3x3 Y 2x4x6x6"]
    lines = cudnn_conv.describe(engine)
    assert lines[0] == "convolutions: cuDNN 9.99.0, 2 plan(s) built"
    assert "1 declined by cuDNN" in lines[1]
    assert "no engine for this convolution" in lines[2]


def test_types_without_cudnn_convolutions_fall_back():
    x = np.ones((1, 1, 4, 4), np.int32)  # ConvInteger's kin: not a cuDNN float type
    frontend = FakeFrontend()
    engine = _engine(frontend)
    assert not engine.forward(x, np.ones((1, 1, 3, 3), np.int32), np.empty((1, 1, 2, 2), np.int32),
                              [0, 0], [0, 0], [1, 1], [1, 1])
    assert frontend.builds == 0
    assert "cuDNN has no int32 convolutions" in engine.declined.values()


def test_start_says_why_cudnn_does_not_run(monkeypatch):
    monkeypatch.setenv(cudnn_conv.ENVIRONMENT, "0")
    assert cudnn_conv.start(None) == "turned off by ONNXGRAD_CUDNN=0"
    monkeypatch.delenv(cudnn_conv.ENVIRONMENT)
    monkeypatch.setitem(sys.modules, "cudnn", None)  # not installed
    reason = cudnn_conv.start(None)
    assert "not installed" in reason and "onnxgrad[gpu]" in reason
    broken = FakeFrontend()
    broken.create_handle = lambda: (_ for _ in ()).throw(RuntimeError("Unable to find symbol "
                                                                      "cudnnCreate"))
    monkeypatch.setitem(sys.modules, "cudnn", broken)
    assert cudnn_conv.start(None) == ("cuDNN did not start (RuntimeError: Unable to find "
                                      "symbol cudnnCreate)")
    assert cudnn_conv.describe(reason)[0].startswith("convolutions without cuDNN (im2col")


def test_inspect_says_what_runs_the_kernels():
    model = Path(__file__).resolve().parents[1] / "models" / "digits_mlp.onnx"
    result = CliRunner().invoke(main, ["inspect", str(model), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("device: cpu, ") and "thread(s); kernels " in last


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("x_shape,w_shape,attrs", CASES)
def test_cudnn_on_the_device_equals_the_cpu(x_shape, w_shape, attrs, dtype):
    """The real cuDNN on a CUDA device against the CPU kernels (float32 may run on TF32
    tensor cores: a tolerance of TF32's rounding, relative to the result's scale)."""
    from onnxgrad.backend import cuda_available, get_backend

    if not cuda_available():
        pytest.skip("no CUDA device")
    backend = get_backend("cuda")
    if isinstance(backend.convolutions, str):
        pytest.skip(f"convolutions without cuDNN: {backend.convolutions}")
    rng = np.random.default_rng(2)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    dy = rng.standard_normal(conv.Conv(np, x, w, **attrs)[0].shape).astype(dtype)
    want = _run(np, x, w, dy, attrs)
    before = backend.convolutions.built() + len(backend.convolutions.declined)
    got = _run(backend.xp, *(backend.asarray(a) for a in (x, w, dy)), attrs)
    assert backend.convolutions.built() + len(backend.convolutions.declined) == before + 3
    tolerance = 1e-10 if dtype == np.float64 else 3e-3
    for name in want:
        scale = float(np.abs(want[name]).max())
        np.testing.assert_allclose(backend.to_host(got[name]), want[name], rtol=0,
                                   atol=tolerance * scale, err_msg=name)

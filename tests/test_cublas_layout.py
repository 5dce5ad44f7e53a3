"""The CUDA backend's products (onnxgrad.cublas) on the CPU: the array module
is NumPy behind a stand-in for cuBLAS that reads memory as cuBLAS does
(column-major, leading dimensions, batch strides, transposes), so every way of
laying out operands is checked against NumPy's own products."""

from __future__ import annotations

import ctypes
import types

import numpy as np
import pytest

from onnxgrad import cublas


class _Data:
    def __init__(self, ptr):
        self.ptr = ptr


class FakeArray(np.ndarray):
    """A NumPy array with CuPy's ``data.ptr``."""

    @property
    def data(self):  # noqa: D401 - CuPy's memory pointer
        return _Data(self.__array_interface__["data"][0])


def _wrap(x):
    return np.asarray(x).view(FakeArray)


def _fake_cupy():
    def wrapped(fn):
        return lambda *a, **k: _wrap(fn(*a, **k))

    return types.SimpleNamespace(
        ndarray=FakeArray, matmul=np.matmul, dot=np.dot, einsum=np.einsum,
        empty=wrapped(np.empty), ascontiguousarray=wrapped(np.ascontiguousarray),
        broadcast_to=wrapped(np.broadcast_to))


def _column_major(ptr, dtype, rows, cols, ld, stride, batch):
    itemsize = np.dtype(dtype).itemsize
    extent = (batch - 1) * stride + (cols - 1) * ld + rows
    flat = np.ctypeslib.as_array((ctypes.c_char * (extent * itemsize)).from_address(ptr))
    flat = flat.view(dtype)
    return np.lib.stride_tricks.as_strided(
        flat, (batch, rows, cols), (stride * itemsize, itemsize, ld * itemsize))


class FakeLibrary:
    """cublasGemmStridedBatchedEx in NumPy: C = op(A)·op(B), column-major."""

    handle = None
    calls = 0

    def bind_stream(self):
        pass

    def gemm(self, handle, transa, transb, m, n, k, alpha, A, atype, lda, stride_a, B, btype,
             ldb, stride_b, beta, C, ctype, ldc, stride_c, batch, compute, algo):
        FakeLibrary.calls += 1
        dtype = {0: np.float32, 1: np.float64, 2: np.float16}[atype]
        a = _column_major(A, dtype, *((k, m) if transa else (m, k)), lda, stride_a, batch)
        b = _column_major(B, dtype, *((n, k) if transb else (k, n)), ldb, stride_b, batch)
        c = _column_major(C, dtype, m, n, ldc, stride_c, batch)
        opa = a.transpose(0, 2, 1) if transa else a
        opb = b.transpose(0, 2, 1) if transb else b
        c[...] = np.matmul(opa.astype(np.float64), opb.astype(np.float64)).astype(dtype)
        return 0


def _module():
    cp = _fake_cupy()
    lib = FakeLibrary()
    return cp, lambda: lib


def _operands(rng, shape, layout):
    x = rng.standard_normal(shape)
    if layout == "C":
        return x
    if layout == "F":  # each matrix column-major
        return np.swapaxes(np.ascontiguousarray(np.swapaxes(x, -1, -2)), -1, -2)
    if layout == "strided":  # every second column of a wider array
        wide = np.zeros(shape[:-1] + (2 * shape[-1],))
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "padded":  # rows of a wider array (leading dimension > columns)
        wide = np.zeros(shape[:-1] + (shape[-1] + 3,))
        wide[..., :shape[-1]] = x
        return wide[..., :shape[-1]]
    raise AssertionError(layout)


CASES = [((4, 3), (3, 5)), ((1, 3), (3, 1)), ((4, 1), (1, 5)), ((2, 4, 3), (3, 5)),
         ((4, 3), (2, 3, 5)), ((2, 1, 4, 3), (3, 3, 5)), ((6, 2, 4, 3), (6, 2, 3, 5)),
         ((3,), (3, 5)), ((4, 3), (3,)), ((3,), (3,)), ((2, 4, 0), (0, 5))]


@pytest.mark.parametrize("shapes", CASES, ids=[f"{a}@{b}" for a, b in CASES])
@pytest.mark.parametrize("layout_a", ["C", "F", "strided", "padded"])
@pytest.mark.parametrize("layout_b", ["C", "F", "padded"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_products_match_numpy(shapes, layout_a, layout_b, dtype):
    rng = np.random.default_rng(0)
    a = _operands(rng, shapes[0], layout_a if len(shapes[0]) > 1 else "C").astype(dtype)
    b = _operands(rng, shapes[1], layout_b if len(shapes[1]) > 1 else "C").astype(dtype)
    cp, lib = _module()
    got = cublas._matmul(cp, lib, _wrap(a), _wrap(b), None)
    want = np.matmul(a.astype(np.float64), b.astype(np.float64))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_product_into_out_and_a_transposed_view():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((5, 4)), rng.standard_normal((5, 3))
    cp, lib = _module()
    out = _wrap(np.empty((4, 3)))
    before = FakeLibrary.calls
    result = cublas._matmul(cp, lib, _wrap(a).T, _wrap(b), out)
    assert result is out and FakeLibrary.calls == before + 1  # read transposed, not copied
    np.testing.assert_allclose(out, a.T @ b)
    with pytest.raises(ValueError, match="do not fit"):
        cublas._matmul(cp, lib, _wrap(a), _wrap(b), None)


EINSUMS = [("ncp,ncp->c", (2, 3, 4), (2, 3, 4)), ("gmk,ngkp->ngmp", (2, 3, 4), (5, 2, 4, 6)),
           ("ij,jk->ik", (3, 4), (4, 5)), ("bij,bkj->bik", (2, 3, 4), (2, 5, 4)),
           ("ij,k->ijk", (2, 3), (4,)), ("ijx,jk->ki", (3, 4, 2), (4, 5)),
           ("bhdm,bhd->bhm", (2, 3, 4, 5), (2, 3, 4))]


@pytest.mark.parametrize("spec,sa,sb", EINSUMS, ids=[e[0] for e in EINSUMS])
def test_einsum_as_one_product(spec, sa, sb):
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal(sa), rng.standard_normal(sb)
    cp, lib = _module()
    got = cublas._einsum2(cp, lib, spec, _wrap(a), _wrap(b))
    np.testing.assert_allclose(got, np.einsum(spec, a, b), rtol=1e-12, atol=1e-12)


def test_einsum_forms_left_to_cupy():
    cp, lib = _module()
    x = _wrap(np.ones((3, 3)))
    for spec in ("ii,ij->j", "...i,...i->...", "ij,jk"):
        assert cublas._einsum2(cp, lib, spec, x, x) is None

"""Matrix products, Gemm and MatMul, and the determinant, Det.

MatMul's gradient is written in standard ops where the operands' ranks are known
when the backward graph is built, else it is the private ``MatMulGrad``, whose
standard form does the same on shape values at run time (an Einsum over operands
brought to one rank).

Det's gradient is the private ``DetGrad``: ``dY`` times the cofactor matrix,
computed from the SVD so that it is exact for singular matrices too.
"""

from __future__ import annotations

import numpy as np  # host constants of standard forms

from onnxgrad.ops import standard as std
from onnxgrad.ops.elementwise import SumToShape
from onnxgrad.ops.registry import op
from onnxgrad.threads import matmul


@op("Gemm", since=7, differentiable=("A", "B", "C"))
def Gemm(xp, A, B, C=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
    # One declaration covers opsets 7-13: they differ only in types and in C
    # becoming optional (11); C broadcasts to (M, N) in all of them.
    Y = matmul(xp, A.T if transA else A, B.T if transB else B)
    if Y.dtype.kind == "f":  # Y is a fresh array: scale and add in place
        if alpha != 1.0:
            Y *= alpha
        if C is not None:
            Y += C * beta if beta != 1.0 else C
        return (Y,)
    if alpha != 1.0:
        Y = Y * alpha
    if C is not None:
        Y = Y + (C * beta if beta != 1.0 else C)
    if Y.dtype != A.dtype:  # integer Gemm with a float alpha or beta
        Y = Y.astype(A.dtype)
    return (xp.asarray(Y),)


@Gemm.gradient
def _(g, node, dY):
    A, B = node.inputs[:2]
    C = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    alpha, beta = node.attrs["alpha"], node.attrs["beta"]
    tA, tB = int(node.attrs["transA"]), int(node.attrs["transB"])
    # Y = alpha * op(A) @ op(B) + beta * C; each gradient is itself one Gemm.
    if tA:
        dA = g.Gemm(B, dY, alpha=alpha, transA=tB, transB=1)       # alpha * op(B) @ dY^T
    else:
        dA = g.Gemm(dY, B, alpha=alpha, transB=1 - tB)             # alpha * dY @ op(B)^T
    dB = g.private("GemmGradB", dY, A, B, alpha=alpha, transA=tA, transB=tB)
    dC = None
    if C is not None:
        dC = dY if beta == 1.0 else g.Mul(dY, g.scalar(beta, like=C))
        dC = g.unbroadcast(dC, like=C)
    return (dA, dB, dC)[:len(node.inputs)]


@op("GemmGradB", domain="onnxgrad")
def GemmGradB(xp, dY, A, B, *, alpha=1.0, transA=0, transB=0):
    """Gemm's gradient for B, in B's memory order: a weight that a trainer keeps
    column-major (see ``Trainer``) gets a column-major gradient, so that its
    optimizer update runs over both in step.  ``B`` is read for its layout only."""
    opA = A.T if transA else A
    # dB = alpha * dY^T @ op(A) (transB) or alpha * op(A)^T @ dY; its transpose is the
    # product of the same operands in the other order.
    first, second = (dY.T, opA) if transB else (opA.T, dY)
    if B.flags.f_contiguous and not B.flags.c_contiguous:
        dB = matmul(xp, second.T, first.T).T
    else:
        dB = matmul(xp, first, second)
    if alpha != 1.0:
        dB *= alpha
    return (dB,)


@GemmGradB.in_standard_ops
def _(g, node):
    dY, A, _ = node.inputs
    alpha, transA = node.attrs.get("alpha", 1.0), node.attrs.get("transA", 0)
    if node.attrs.get("transB", 0):   # dB = alpha · dYᵀ · op(A)
        return (g.Gemm(dY, A, alpha=alpha, transA=1, transB=transA),)
    return (g.Gemm(A, dY, alpha=alpha, transA=1 - transA, transB=0),)   # alpha · op(A)ᵀ · dY


@op("MatMul", since=1, differentiable=("A", "B"))
def MatMul(xp, A, B):
    if A.ndim > 2 and B.ndim == 2:  # one large product instead of a batch of small ones
        Y = matmul(xp, A.reshape(-1, A.shape[-1]), B).reshape(A.shape[:-1] + (B.shape[-1],))
    else:
        Y = xp.asarray(matmul(xp, A, B))
    if Y.dtype != A.dtype and A.dtype == B.dtype:  # ml_dtypes' bfloat16 multiplies in float32
        Y = Y.astype(A.dtype)
    return (Y,)


@MatMul.gradient
def _(g, node, dY):
    A, B = node.inputs
    ra, rb = g.rank(A), g.rank(B)
    if ra is None or rb is None:  # ranks known only at run time
        return (g.private("MatMulGrad", dY, A, B, wrt=0),
                g.private("MatMulGrad", dY, A, B, wrt=1))
    return _static_grads(g, dY, A, B, ra, rb)


def _static_grads(g, dY, A, B, ra, rb, want=(True, True)):
    """(dA, dB) of ``Y = A @ B`` for static ranks ``ra`` and ``rb``, in standard ops (and
    SumToShape); an entry ``want`` leaves out is None."""
    want_a, want_b = want
    if ra == 1 and rb == 1:  # a dot product: Y is a scalar
        return (g.Mul(dY, B) if want_a else None, g.Mul(dY, A) if want_b else None)

    def swap_last(x, rank):  # x^T on the last two axes
        return g.Transpose(x, perm=list(range(rank - 2)) + [rank - 1, rank - 2])

    dA = dB = None
    # NumPy promotes a 1-D operand to a matrix (A: 1 x K, B: K x 1) and drops the
    # added axis from Y; put it back in dY, and work with 2-D (or more) operands.
    if ra == 1:                                   # Y = A @ B: (..., N), A is (K,)
        dY2 = g.Unsqueeze(dY, g.ints([-2]))       # (..., 1, N)
        if want_a:
            dA = g.MatMul(dY2, swap_last(B, rb))  # (..., 1, K)
            dA = g.private("SumToShape", g.Squeeze(dA, g.ints([-2])), g.shape_of(A))
        if want_b:
            A2 = g.Unsqueeze(A, g.ints([0]))      # (1, K)
            dB = g.unbroadcast(g.MatMul(swap_last(A2, 2), dY2), like=B)  # (K, 1) @ (..., 1, N)
        return (dA, dB)
    if rb == 1:                                   # Y: (..., M), B is (K,)
        dY2 = g.Unsqueeze(dY, g.ints([-1]))       # (..., M, 1)
        if want_a:
            B2 = g.Unsqueeze(B, g.ints([0]))      # (1, K)
            dA = g.unbroadcast(g.MatMul(dY2, B2), like=A)  # (..., M, K)
        if want_b:
            dB = g.MatMul(swap_last(A, ra), dY2)  # (..., K, 1)
            dB = g.private("SumToShape", g.Squeeze(dB, g.ints([-1])), g.shape_of(B))
        return (dA, dB)
    if want_a:
        dA = g.unbroadcast(g.MatMul(dY, swap_last(B, rb)), like=A)
    if not want_b:
        return (dA, None)
    shape_b = g.shape(B)
    if rb == 2 and ra > 2 and shape_b is not None and all(isinstance(d, int) for d in shape_b):
        # A linear layer over a batch of sequences: dB = A^T dY over every row at
        # once, one product with no batch of partial sums to add up.
        K, N = shape_b
        dB = g.Gemm(g.Reshape(A, g.ints([-1, K])), g.Reshape(dY, g.ints([-1, N])), transA=1)
        return (dA, dB)
    return (dA, g.unbroadcast(g.MatMul(swap_last(A, ra), dY), like=B))


@op("MatMulGrad", domain="onnxgrad")
def MatMulGrad(xp, dY, A, B, *, wrt=0):
    """The gradient of MatMul for input ``wrt`` (0: A, 1: B), whatever the ranks.

    Used where the ranks are unknown when the backward graph is built; it does
    at run time what the standard-op decomposition does statically.
    """
    a = A.reshape(1, -1) if A.ndim == 1 else A           # (..., M, K)
    b = B.reshape(-1, 1) if B.ndim == 1 else B           # (..., K, N)
    d = dY                                               # put back the axes NumPy dropped:
    if A.ndim == 1 and B.ndim == 1:
        d = d.reshape(1, 1)
    elif A.ndim == 1:
        d = xp.expand_dims(d, -2)
    elif B.ndim == 1:
        d = xp.expand_dims(d, -1)                        # (..., M, N)
    if wrt == 0:
        grad = matmul(xp, d, xp.swapaxes(b, -1, -2))      # (..., M, K)
        if A.ndim == 1:
            grad = grad[..., 0, :]
        return SumToShape(xp, grad, A.shape)
    grad = matmul(xp, xp.swapaxes(a, -1, -2), d)          # (..., K, N)
    if B.ndim == 1:
        grad = grad[..., 0]
    return SumToShape(xp, grad, B.shape)


@MatMulGrad.in_standard_ops
def _(g, node):
    dY, A, B = node.inputs
    wrt = node.attrs.get("wrt", 0)
    ra, rb = g.rank(A), g.rank(B)
    if ra is not None and rb is not None:
        return (_static_grads(g, dY, A, B, ra, rb, want=(wrt == 0, wrt == 1))[wrt],)
    # Ranks known only at run time: the kernel's steps on shape values.  A 1-D A becomes
    # (1, K), a 1-D B (K, 1), dY gets back the axes MatMul dropped; the product of the
    # last two axes is an Einsum over operands brought to one rank (onnxruntime's Einsum
    # wants the same number of axes under every ellipsis), broadcasting the batch axes.
    def i64(values):
        return g.ints(values)

    def ones(count):  # a 1-D int64 run of ``count`` (a 1-D value of one entry) ones
        return g.ConstantOfShape(count, value=np.ones(1, dtype=np.int64), dtype="int64")

    def rank_of(shape):  # a shape value's length, as a 1-D value of one entry
        return g.Shape(shape, dtype="int64")

    sa, sb, sd = (g.Shape(v, dtype="int64") for v in (A, B, dY))
    ra_t, rb_t = rank_of(sa), rank_of(sb)
    two, zero = i64([2]), i64([0])
    pad_a = g.Max(g.Sub(two, ra_t, dtype="int64"), zero, dtype="int64")   # 1 for 1-D A, else 0
    pad_b = g.Max(g.Sub(two, rb_t, dtype="int64"), zero, dtype="int64")
    shape_a = g.Concat(ones(pad_a), sa, axis=0, dtype="int64")           # (..., M, K)
    shape_b = g.Concat(sb, ones(pad_b), axis=0, dtype="int64")           # (..., K, N)
    kept = g.Sub(g.Sub(two, pad_a, dtype="int64"), pad_b, dtype="int64")  # matrix axes in Y
    batch = g.Slice(sd, zero, g.Sub(rank_of(sd), kept, dtype="int64"))
    shape_d = g.Concat(batch, g.Slice(shape_a, i64([-2]), i64([-1])),
                       g.Slice(shape_b, i64([-1]), i64([std.END])), axis=0, dtype="int64")
    d = g.Reshape(dY, shape_d)                                           # (..., M, N)
    other, other_shape = (B, shape_b) if wrt == 0 else (A, shape_a)
    width = g.Max(rank_of(shape_d), rank_of(other_shape), dtype="int64")

    def widened(value, shape):
        lead = ones(g.Sub(width, rank_of(shape), dtype="int64"))
        return g.Reshape(value, g.Concat(lead, shape, axis=0, dtype="int64"))

    d, other = widened(d, shape_d), widened(other, other_shape)
    if wrt == 0:
        grad = g.Einsum(d, other, equation="...mn,...kn->...mk")          # (..., M, K)
        return (g.private("SumToShape", grad, sa),)
    grad = g.Einsum(other, d, equation="...mk,...mn->...kn")              # (..., K, N)
    full = g.Shape(grad, dtype="int64")
    grad = g.Reshape(grad, g.Slice(full, zero, g.Sub(rank_of(full), pad_b, dtype="int64")))
    return (g.private("SumToShape", grad, sb),)


# -- Det ------------------------------------------------------------------------------------

@op("Det", since=11, differentiable=("X",))
def Det(xp, X):
    if X.dtype.kind != "f" or X.dtype.itemsize < 4:  # float16, bfloat16: through float32
        return (xp.linalg.det(X.astype(xp.float32)).astype(X.dtype),)
    return (xp.asarray(xp.linalg.det(X)),)


@Det.gradient
def _(g, node, dY):
    return (g.private("DetGrad", dY, node.inputs[0]),)


@op("DetGrad", domain="onnxgrad")
def DetGrad(xp, dY, X):
    """dY times the cofactor matrix of X (the gradient of det), from the SVD X = U·S·Vᵀ:
    cof(X) = det(U)·det(Vᵀ) · U·diag(Π_{j≠i} s_j)·Vᵀ, exact for singular X too."""
    work = X.astype(xp.float64)
    U, s, Vt = xp.linalg.svd(work)
    ones = xp.ones(s.shape[:-1] + (1,), dtype=s.dtype)
    before = xp.cumprod(xp.concatenate([ones, s[..., :-1]], axis=-1), axis=-1)
    after = xp.flip(xp.cumprod(xp.concatenate([ones, xp.flip(s, -1)[..., :-1]], axis=-1),
                               axis=-1), -1)
    sign = xp.linalg.det(U) * xp.linalg.det(Vt)
    cofactor = (U * (before * after)[..., None, :]) @ Vt
    dX = (dY.astype(xp.float64) * sign)[..., None, None] * cofactor
    return (dX.astype(dY.dtype),)


@DetGrad.in_standard_ops
def _(g, node):
    """The cofactors as signed determinants of the minors, all n² of them gathered at
    once: exact for singular matrices too.  Needs the matrix size n (static)."""
    dY, X = node.inputs
    shape = std.tensor_shape(g, X)
    if shape is None or len(shape) < 2 or not isinstance(shape[-1], int):
        return None
    n, r = shape[-1], len(shape)
    if n == 1:  # the cofactor of a 1×1 matrix is 1
        return (g.Expand(g.Unsqueeze(dY, g.ints([-2, -1])), g.Shape(X, dtype="int64")),)
    others = g.ints([[k for k in range(n) if k != i] for i in range(n)])  # (n, n-1)
    rows = g.Gather(X, others, axis=r - 2)        # (..., n_i, n-1, n)
    both = g.Gather(rows, others, axis=r)         # (..., n_i, n-1, n_j, n-1)
    batch = list(range(r - 2))
    minors = g.Transpose(both, perm=batch + [r - 2, r, r - 1, r + 1])
    signs = np.array([[(-1.0) ** (i + j) for j in range(n)] for i in range(n)])
    cofactor = g.Mul(g.Det(minors), g.const(signs, dtype=g.dtype(X)))
    return (g.Mul(g.Unsqueeze(dY, g.ints([-2, -1])), cofactor),)

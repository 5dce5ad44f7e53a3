"""Winograd F(2×2, 3×3): 3×3 stride-1 convolutions with 2.25× fewer multiplications.

Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks" (2016).
The output is cut into 2×2 tiles; each reads a 4×4 tile of the input.  With
``B``, ``G`` and ``A`` the transforms below, one output tile of one channel is

    Y = Aᵀ [ Σ_c (G w_c Gᵀ) ⊙ (Bᵀ d_c B) ] A,

so the 3×3 window sums become 16 elementwise products per tile, and the sum
over input channels 16 matrix products ``U_ξ (M×C) @ V_ξ (C×tiles)``, one per
point ξ of the 4×4 transformed tile.  Here the 2-D transforms are the
Kronecker products of the 1-D ones (a 16×16, a 16×9 and a 4×16 matrix), each
applied as one product over every tile.

The batch is taken in chunks small enough that a chunk's transformed tiles
stay in cache between the transforms and the products, but wide enough for
the products to run at BLAS speed; the chunks run on the thread pool.

Conv's forward pass and its stride-1 input gradient (a Conv with the flipped
kernel, see ``conv.flipped_input_grad``) come here from ``conv.conv_forward``
when :func:`applies`.  Results equal the direct convolution's up to float
rounding (relative error of order 1e-6 in float32).
"""

from __future__ import annotations

from onnxgrad.threads import each, sum_in_order

_BT = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
_G = [[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]]
_AT = [[1, 1, 1, 0], [0, 1, -1, -1]]


def _transforms(xp, dtype):
    """The 2-D transforms as Kronecker products of the 1-D ones: a flattened 4×4
    input tile to its transform (16×16), a 3×3 kernel to its transform (16×9), a
    transformed product back to a 2×2 output tile (4×16)."""
    return tuple(xp.kron(xp.asarray(m, dtype=dtype), xp.asarray(m, dtype=dtype))
                 for m in (_BT, _G, _AT))


#: Input and output channels from which a 3×3 stride-1 Conv runs as Winograd:
#: with fewer, the 16 products are too thin to gain on one im2col product.
MIN_CHANNELS = 32

#: Elements of transformed input tiles per chunk (about 512 KiB of float32).
CHUNK_BUDGET = 1 << 17

#: Tiles per chunk at least, so that each of the 16 products is wide enough.
MIN_TILES = 256


#: Output positions per item from which Winograd runs: on smaller images
#: (4×4) the tiles of a batch are too few for its products to gain.
MIN_POSITIONS = 64


#: Output positions per item up to which a weight gradient runs as Winograd:
#: on larger images its products, long sums over few channels, run slower
#: than im2col's.
WEIGHT_GRAD_MAX_POSITIONS = 256


def applies(Xp, w_shape, strides, dilations, group, out) -> bool:
    """Whether a Conv of the padded input ``Xp`` with a weight of ``w_shape`` and
    output size ``out`` (or its weight gradient) runs as Winograd here.  Only on the
    CPU: the transforms are chunked for CPU caches, while on a CUDA device the
    column product is one cuBLAS call."""
    return (type(Xp).__module__ == "numpy" and group == 1 and Xp.ndim == 4 and tuple(w_shape[2:]) == (3, 3)
            and all(s == 1 for s in strides) and all(d == 1 for d in dilations)
            and min(w_shape[0], w_shape[1]) >= MIN_CHANNELS
            and out[0] * out[1] >= MIN_POSITIONS
            and Xp.dtype.kind == "f" and Xp.dtype.itemsize >= 4)


def _grown(xp, Xp, th, tw):
    """``Xp`` with zero rows and columns added so that ``th × tw`` tiles fit."""
    if Xp.shape[2] >= 2 * th + 2 and Xp.shape[3] >= 2 * tw + 2:
        return Xp
    grown = xp.zeros(Xp.shape[:2] + (2 * th + 2, 2 * tw + 2), dtype=Xp.dtype)
    grown[:, :, :Xp.shape[2], :Xp.shape[3]] = Xp
    return grown


def _input_tiles(xp, Xc, to_tiles, th, tw):
    """The transformed input tiles ``(16, C, n·th·tw)`` of a chunk ``Xc`` (n, C, …)."""
    n, C = Xc.shape[:2]
    s = Xc.strides
    tiles = xp.lib.stride_tricks.as_strided(                         # (4, 4, C, n, th, tw)
        Xc, shape=(4, 4, C, n, th, tw), strides=(s[2], s[3], s[1], s[0], 2 * s[2], 2 * s[3]))
    return xp.matmul(to_tiles, xp.ascontiguousarray(tiles).reshape(16, -1)).reshape(16, C, -1)


def _chunks(xp, N, C, th, tw, chunk):
    """Run ``chunk(part)`` over slices of the batch (see :data:`CHUNK_BUDGET`), on
    the thread pool for NumPy; returns the results in batch order."""
    per_item = th * tw
    step = max(1, CHUNK_BUDGET // (16 * C * per_item), -(-MIN_TILES // per_item))
    return each(xp, [slice(i, min(i + step, N)) for i in range(0, N, step)], chunk)


def conv3x3(xp, Xp, W, out):
    """Conv of an already padded input ``Xp`` (N, C, H+2, W+2) with a 3×3 ``W``,
    stride 1: ``(N, M, *out)``."""
    N, C = Xp.shape[:2]
    M = W.shape[0]
    oh, ow = out
    th, tw = -(-oh // 2), -(-ow // 2)                         # tiles per column and row
    Xp = _grown(xp, Xp, th, tw)
    to_tiles, of_weight, from_tiles = _transforms(xp, Xp.dtype)
    U = xp.matmul(of_weight, W.reshape(M * C, 9).T).reshape(16, M, C)
    Y = xp.empty((N, M, 2 * th, 2 * tw), dtype=Xp.dtype)

    def chunk(part):
        V = _input_tiles(xp, Xp[part], to_tiles, th, tw)
        products = xp.matmul(U, V)                                   # (16, M, n·th·tw)
        Yt = xp.matmul(from_tiles, products.reshape(16, -1)).reshape(2, 2, M, -1, th, tw)
        Y[part] = Yt.transpose(3, 2, 4, 0, 5, 1).reshape(-1, M, 2 * th, 2 * tw)

    _chunks(xp, N, C, th, tw, chunk)
    if 2 * th != oh or 2 * tw != ow:
        Y = xp.ascontiguousarray(Y[:, :, :oh, :ow])
    return Y


def weight_grad3x3(xp, dY, Xp):
    """dW ``(M, C, 3, 3)`` of a 3×3 stride-1 Conv of the padded input ``Xp`` given
    its output gradient ``dY`` (N, M, *out): the adjoint of :func:`conv3x3` in
    the weight, ``dW = Gᵀ [Σ_tiles (A dY_t Aᵀ) ⊙ (Bᵀ d_t B)] G``, that is 16
    products ``dŶ_ξ (M×tiles) @ V_ξᵀ (tiles×C)`` summed over the chunks in
    batch order."""
    N, M, oh, ow = dY.shape
    C = Xp.shape[1]
    th, tw = -(-oh // 2), -(-ow // 2)
    Xp = _grown(xp, Xp, th, tw)
    if 2 * th != oh or 2 * tw != ow:
        dY = _grown(xp, dY, th - 1, tw - 1)[:, :, :2 * th, :2 * tw]
    to_tiles, of_weight, from_tiles = _transforms(xp, Xp.dtype)

    def chunk(part):
        V = _input_tiles(xp, Xp[part], to_tiles, th, tw)             # (16, C, T)
        d = dY[part]
        n = d.shape[0]
        blocks = xp.ascontiguousarray(                               # (2, 2, M, n, th, tw)
            d.reshape(n, M, th, 2, tw, 2).transpose(3, 5, 1, 0, 2, 4)).reshape(4, -1)
        dhat = xp.matmul(from_tiles.T, blocks).reshape(16, M, -1)            # (16, M, T)
        return xp.matmul(dhat, xp.swapaxes(V, 1, 2))                 # (16, M, C)

    dU = sum_in_order(_chunks(xp, N, C, th, tw, chunk))
    return xp.matmul(of_weight.T, dU.reshape(16, -1)).reshape(3, 3, M, C).transpose(2, 3, 0, 1).copy()

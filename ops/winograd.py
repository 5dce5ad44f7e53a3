"""Winograd F(2×2, 3×3) and F(4×4, 3×3): 3×3 stride-1 convolutions with fewer multiplications.

Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks" (2016).
The output is cut into m×m tiles (m = 2 or 4); each reads an (m+2)×(m+2)
tile of the input.  With ``B``, ``G`` and ``A`` the transforms below, one
output tile of one channel is

    Y = Aᵀ [ Σ_c (G w_c Gᵀ) ⊙ (Bᵀ d_c B) ] A,

so the 3×3 window sums become (m+2)² elementwise products per tile, and the
sum over input channels (m+2)² matrix products ``U_ξ (M×C) @ V_ξ (C×tiles)``,
one per point ξ of the transformed tile: 16 products per 4 outputs for
F(2×2) (4 multiplications per output, against 9), 36 per 16 for F(4×4)
(2.25).  Here the 2-D transforms are the Kronecker products of the 1-D ones
(for F(2×2) a 16×16, a 16×9 and a 4×16 matrix; for F(4×4) 36×36, 36×9 and
16×36), each applied as one product over every tile.

F(4×4) is built on the points 0, 1, -1, 1/2, -2 and ∞ rather than the usual
0, ±1, ±2, ∞: its transforms have smaller coefficients (Aᵀ's largest is 8
rather than 8² = 64 across a tile), which makes its float32 error some 2.5×
smaller.  It runs where the batch has enough tiles (:data:`F4_MIN_TILES`).

The batch is taken in chunks small enough that a chunk's transformed tiles
stay in cache between the transforms and the products, but wide enough for
the products to run at BLAS speed; the chunks run on the thread pool, and
the products of a batch taken in one chunk are split there
(:func:`onnxgrad.threads.matmul`).  Where
compiled kernels run (``ops/compiled.py``), the transforms are loops of
additions that read the input where it lies and write the output in place
(:func:`_input_kernel` and :func:`_output_kernel`, for both tile sizes, and
:func:`_grad_tiles_kernel` with its F(4×4) form :func:`_grad_tiles_kernel4`);
elsewhere they are products with the Kronecker matrices and layout copies.  The
products are BLAS calls either way.

Conv's forward pass and its stride-1 input gradient (a Conv with the flipped
kernel, see ``conv.flipped_input_grad``) come here from ``conv.conv_forward``
when :func:`applies`.  Results equal the direct convolution's up to float
rounding (relative error of order 1e-6 in float32 for F(2×2), a few 1e-6 for
F(4×4)).
"""

from __future__ import annotations

import numpy as np

from onnxgrad.ops import compiled
from onnxgrad.threads import each, matmul, sum_in_order

# F(2×2, 3×3): the points 0, 1, -1 and ∞
_BT = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
_G = [[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]]
_AT = [[1, 1, 1, 0], [0, 1, -1, -1]]

# F(4×4, 3×3): the points 0, 1, -1, 1/2, -2 and ∞ (rows of Bᵀ and G, columns of Aᵀ)
_BT4 = [[1, -1.5, -2, 1.5, 1, 0],
        [0, -1, .5, 2.5, 1, 0],
        [0, 1, -2.5, .5, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, .5, -1, -.5, 1, 0],
        [0, 1, -1.5, -2, 1.5, 1]]
_G4 = [[1, 0, 0],
       [1 / 3, 1 / 3, 1 / 3],
       [-1 / 3, 1 / 3, -1 / 3],
       [-16 / 15, -8 / 15, -4 / 15],
       [1 / 15, -2 / 15, 4 / 15],
       [0, 0, 1]]
_AT4 = [[1, 1, 1, 1, 1, 0],
        [0, 1, -1, .5, -2, 0],
        [0, 1, 1, .25, 4, 0],
        [0, 1, -1, .125, -8, 1]]

_MATRICES = {2: (_BT, _G, _AT), 4: (_BT4, _G4, _AT4)}


def _transforms(xp, dtype, m):
    """The 2-D transforms of F(m×m, 3×3) as Kronecker products of the 1-D ones: a
    flattened (m+2)×(m+2) input tile to its transform ((m+2)²×(m+2)²), a 3×3
    kernel to its transform ((m+2)²×9), a transformed product back to an m×m
    output tile (m²×(m+2)²)."""
    return tuple(xp.kron(xp.asarray(a, dtype=dtype), xp.asarray(a, dtype=dtype))
                 for a in _MATRICES[m])


#: Input and output channels from which a 3×3 stride-1 Conv runs as Winograd:
#: with fewer, the 16 products are too thin to gain on one im2col product.
MIN_CHANNELS = 32

#: Elements of transformed input tiles per chunk (about 512 KiB of float32).
CHUNK_BUDGET = 1 << 17

#: Tiles per chunk at least, so that each of the products is wide enough.
MIN_TILES = 256


#: Output positions per item from which Winograd runs, or output positions in
#: the batch: on smaller images (4×4) of a small batch the transform of the
#: weight costs more than the products save (measured at 512 channels on 4×4:
#: 2.5× slower than im2col at batch 8, 1.6× faster at batch 32).
MIN_POSITIONS = 64
MIN_BATCH_POSITIONS = 512


#: Output positions per item up to which a weight gradient runs as Winograd:
#: on larger images its products, long sums over few channels, run slower
#: than im2col's (at 32×32 with 64 channels Winograd is 1.9× faster).
WEIGHT_GRAD_MAX_POSITIONS = 1024

#: Tiles of 4×4 outputs in the batch from which Winograd runs as F(4×4, 3×3)
#: rather than F(2×2, 3×3): with fewer, its 36 products are too thin, and the
#: transform of the weight (36·M·C values) costs more than they save.
F4_MIN_TILES = 64


def applies(Xp, w_shape, strides, dilations, group, out) -> bool:
    """Whether a Conv of the padded input ``Xp`` with a weight of ``w_shape`` and
    output size ``out`` (or its weight gradient) runs as Winograd here.  Only on the
    CPU: the transforms are chunked for CPU caches, while on a CUDA device the
    column product is one cuBLAS call."""
    return (type(Xp).__module__ == "numpy" and group == 1 and Xp.ndim == 4 and tuple(w_shape[2:]) == (3, 3)
            and all(s == 1 for s in strides) and all(d == 1 for d in dilations)
            and min(w_shape[0], w_shape[1]) >= MIN_CHANNELS
            and (out[0] * out[1] >= MIN_POSITIONS
                 or Xp.shape[0] * out[0] * out[1] >= MIN_BATCH_POSITIONS)
            and Xp.dtype.kind == "f" and Xp.dtype.itemsize >= 4)


def _tile(N, out) -> int:
    """The side m of the output tiles, 2 or 4, for a batch of ``N`` outputs of size
    ``out`` (see :data:`F4_MIN_TILES`)."""
    return 4 if N * -(-out[0] // 4) * -(-out[1] // 4) >= F4_MIN_TILES else 2


def _grown(xp, A, rows, cols):
    """``A`` (N, C, …) with zero rows and columns added to make it ``rows × cols``
    at least."""
    if A.shape[2] >= rows and A.shape[3] >= cols:
        return A
    grown = xp.zeros(A.shape[:2] + (rows, cols), dtype=A.dtype)
    grown[:, :, :A.shape[2], :A.shape[3]] = A
    return grown


def _input_tiles(xp, Xc, to_tiles, m, th, tw):
    """The transformed input tiles ``((m+2)², C, n·th·tw)`` of F(m×m, 3×3) of a chunk
    ``Xc`` (n, C, …)."""
    n, C = Xc.shape[:2]
    k = m + 2
    s = Xc.strides
    tiles = xp.lib.stride_tricks.as_strided(                         # (k, k, C, n, th, tw)
        Xc, shape=(k, k, C, n, th, tw), strides=(s[2], s[3], s[1], s[0], m * s[2], m * s[3]))
    return xp.matmul(to_tiles, xp.ascontiguousarray(tiles).reshape(k * k, -1)).reshape(k * k, C, -1)


# -- compiled transforms --------------------------------------------------------------------
#
# Each kernel makes one pass over its chunk: it reads the tiles where they lie
# and writes the layout the products take (or, for the output, Y's own), with
# the transforms written out as additions (and, for F(4×4), multiplications by
# the transforms' constants, held in the arrays' own float type).  A row that
# crosses the edge of the array is first copied into a zero-padded row buffer,
# so that the inner loop over a row's tiles is the same everywhere.  The tile
# ``(a, b)`` of item ``i`` of a chunk starting at item ``start`` is column
# ``((i - start)·th + a)·tw + b`` of the transformed arrays, as in the NumPy
# forms.  Each kernel transforms the channels ``[first, last)`` (its last two
# arguments): input channels for the input tiles, output channels for the
# others, so that :func:`_in_parts` can split it.  The input and output transforms
# serve both tile sizes: they take ``m`` and branch on it outside their loops over
# a row's tiles.  (The output-gradient transform, written so, ran 4-15% slower for
# F(4×4), measured; it stays two kernels.)


def _planes(xp, count, rows, cols, dtype):
    """An uninitialised ``(count, rows, cols)`` array for the kernels to write or
    read, its ``count`` planes (16 or 36) spaced so that they do not fall on the
    same cache sets: 64 bytes past a multiple of 4 KiB apart.  (Planes a multiple
    of 4 KiB apart, as ``rows·cols`` often makes them, would evict one another
    while a kernel walks all of them at once, some 5× slower.)"""
    itemsize = xp.dtype(dtype).itemsize
    plane = -(-rows * cols * itemsize // 4096) * 4096 + 64
    return xp.empty((count, plane // itemsize), dtype=dtype)[:, :rows * cols].reshape(count, rows, cols)


def _constants(dtype):
    """The constants of the F(4×4) transforms in ``dtype``, so that the kernels'
    arithmetic stays in the arrays' float type: 1/2, 1/4, 1/8, 3/2, 5/2, 2, 4, 8."""
    k = np.empty(8, dtype=dtype)
    k[0], k[1], k[2], k[3] = .5, .25, .125, 1.5
    k[4], k[5], k[6], k[7] = 2.5, 2, 4, 8
    return k


@compiled.kernel
def _input_kernel(Xp, start, stop, m, th, tw, k, V, first, last):
    """``Bᵀ d B`` of F(m×m, 3×3) (``m`` = 2 or 4) of the ``th × tw`` (m+2)×(m+2)
    input tiles ``d`` (stride ``m``) of the items ``[start, stop)`` of ``Xp``
    (N, C, …) into ``V`` ((m+2)², C, (stop - start)·th·tw); rows and columns past
    the edge of ``Xp`` read as zeros; ``k`` holds :func:`_constants`.

    Per channel, a first pass applies ``B`` to the columns of every input row
    (``R[j, r, b]``: column ``j`` of the transform of the m+2 values of row ``r``
    under tile ``b``, computed once for the two tile rows that share the input
    row); a second applies ``Bᵀ`` down the rows of ``R``, writing m+2 planes of
    ``V`` at a time.  (The branches on ``m`` stand outside the loops over a row's
    tiles.)"""
    C, H, W = Xp.shape[1], Xp.shape[2], Xp.shape[3]
    half, three_halves, five_halves, two = k[0], k[3], k[4], k[5]
    width = m * tw + 2
    row = np.zeros(width, dtype=V.dtype)
    R = np.empty((m + 2, m * th + 2, tw), dtype=V.dtype)
    for i in range(start, stop):
        base = (i - start) * th * tw
        for c in range(first, last):
            for r in range(m * th + 2):
                if r >= H:
                    R[:, r, :] = 0
                    continue
                if W >= width:
                    x = Xp[i, c, r]
                else:
                    for q in range(W):
                        row[q] = Xp[i, c, r, q]
                    x = row
                if m == 2:
                    for b in range(tw):
                        # d B: columns x0 - x2, x1 + x2, x2 - x1, x1 - x3 of the 4 values
                        q = 2 * b
                        R[0, r, b] = x[q] - x[q + 2]
                        R[1, r, b] = x[q + 1] + x[q + 2]
                        R[2, r, b] = x[q + 2] - x[q + 1]
                        R[3, r, b] = x[q + 1] - x[q + 3]
                else:
                    for b in range(tw):
                        # d B: the 6 values x0 … x5 times the rows of Bᵀ
                        q = 4 * b
                        x0, x1, x2 = x[q], x[q + 1], x[q + 2]
                        x3, x4, x5 = x[q + 3], x[q + 4], x[q + 5]
                        e = x4 - x2
                        f = x3 - x1
                        R[0, r, b] = x0 + x4 - two * x2 + three_halves * f
                        R[1, r, b] = x4 - x1 + half * x2 + five_halves * x3
                        R[2, r, b] = x4 + x1 - five_halves * x2 + half * x3
                        R[3, r, b] = e + two * f
                        R[4, r, b] = e - half * f
                        R[5, r, b] = x5 + x1 - two * x3 + three_halves * e
            if m == 2:
                for j in range(4):
                    for a in range(th):
                        t = base + a * tw
                        r = 2 * a
                        for b in range(tw):
                            # Bᵀ (d B): the same down the 4 rows of the tile
                            d0, d1 = R[j, r, b], R[j, r + 1, b]
                            d2, d3 = R[j, r + 2, b], R[j, r + 3, b]
                            V[j, c, t + b] = d0 - d2
                            V[4 + j, c, t + b] = d1 + d2
                            V[8 + j, c, t + b] = d2 - d1
                            V[12 + j, c, t + b] = d1 - d3
            else:
                for j in range(6):
                    for a in range(th):
                        t = base + a * tw
                        r = 4 * a
                        for b in range(tw):
                            # Bᵀ (d B): the same down the 6 rows of the tile
                            x0, x1, x2 = R[j, r, b], R[j, r + 1, b], R[j, r + 2, b]
                            x3, x4, x5 = R[j, r + 3, b], R[j, r + 4, b], R[j, r + 5, b]
                            e = x4 - x2
                            f = x3 - x1
                            V[j, c, t + b] = x0 + x4 - two * x2 + three_halves * f
                            V[6 + j, c, t + b] = x4 - x1 + half * x2 + five_halves * x3
                            V[12 + j, c, t + b] = x4 + x1 - five_halves * x2 + half * x3
                            V[18 + j, c, t + b] = e + two * f
                            V[24 + j, c, t + b] = e - half * f
                            V[30 + j, c, t + b] = x5 + x1 - two * x3 + three_halves * e


@compiled.kernel
def _output_kernel(P, start, stop, m, th, tw, k, Y, first, last):
    """``Aᵀ p A`` of F(m×m, 3×3) (``m`` = 2 or 4) of the transformed products ``p``
    in ``P`` ((m+2)², M, (stop - start)·th·tw) into the m×m output tiles of the
    items ``[start, stop)`` of ``Y`` (N, M, oh, ow), cropped at its edge (a tile
    row that crosses it is written into a row buffer first); ``k`` holds
    :func:`_constants`."""
    M, oh, ow = Y.shape[1], Y.shape[2], Y.shape[3]
    half, quarter, eighth, two, four, eight = k[0], k[1], k[2], k[5], k[6], k[7]
    rows = np.empty((m, m * tw), dtype=Y.dtype)
    S = np.empty((4, 6), dtype=Y.dtype)
    for i in range(start, stop):
        for o in range(first, last):
            for a in range(th):
                r = m * a
                inside = r + m <= oh and ow == m * tw
                base = ((i - start) * th + a) * tw
                if m == 2:
                    if inside:
                        y0, y1 = Y[i, o, r], Y[i, o, r + 1]
                    else:
                        y0, y1 = rows[0], rows[1]
                    for b in range(tw):
                        t = base + b
                        # Aᵀ p: rows p0 + p1 + p2 and p1 - p2 - p3, for each of the 4 columns
                        s00 = P[0, o, t] + P[4, o, t] + P[8, o, t]
                        s01 = P[1, o, t] + P[5, o, t] + P[9, o, t]
                        s02 = P[2, o, t] + P[6, o, t] + P[10, o, t]
                        s03 = P[3, o, t] + P[7, o, t] + P[11, o, t]
                        s10 = P[4, o, t] - P[8, o, t] - P[12, o, t]
                        s11 = P[5, o, t] - P[9, o, t] - P[13, o, t]
                        s12 = P[6, o, t] - P[10, o, t] - P[14, o, t]
                        s13 = P[7, o, t] - P[11, o, t] - P[15, o, t]
                        # (Aᵀ p) A: the same on the columns of each row
                        y0[2 * b] = s00 + s01 + s02
                        y0[2 * b + 1] = s01 - s02 - s03
                        y1[2 * b] = s10 + s11 + s12
                        y1[2 * b + 1] = s11 - s12 - s13
                else:
                    if inside:
                        y0, y1, y2, y3 = Y[i, o, r], Y[i, o, r + 1], Y[i, o, r + 2], Y[i, o, r + 3]
                    else:
                        y0, y1, y2, y3 = rows[0], rows[1], rows[2], rows[3]
                    for b in range(tw):
                        t = base + b
                        for j in range(6):
                            # Aᵀ p: the 4 rows of Aᵀ times column j of the tile
                            p0, p1, p2 = P[j, o, t], P[6 + j, o, t], P[12 + j, o, t]
                            p3, p4, p5 = P[18 + j, o, t], P[24 + j, o, t], P[30 + j, o, t]
                            s = p1 + p2
                            d = p1 - p2
                            S[0, j] = p0 + s + p3 + p4
                            S[1, j] = d + half * p3 - two * p4
                            S[2, j] = s + quarter * p3 + four * p4
                            S[3, j] = d + eighth * p3 - eight * p4 + p5
                        q = 4 * b
                        for u in range(4):
                            # (Aᵀ p) A: the same along each row
                            y = y0 if u == 0 else y1 if u == 1 else y2 if u == 2 else y3
                            s = S[u, 1] + S[u, 2]
                            d = S[u, 1] - S[u, 2]
                            p3, p4 = S[u, 3], S[u, 4]
                            y[q] = S[u, 0] + s + p3 + p4
                            y[q + 1] = d + half * p3 - two * p4
                            y[q + 2] = s + quarter * p3 + four * p4
                            y[q + 3] = d + eighth * p3 - eight * p4 + S[u, 5]
                if not inside:
                    for h in range(min(m, oh - r)):
                        for q in range(ow):
                            Y[i, o, r + h, q] = rows[h, q]


@compiled.kernel
def _grad_tiles_kernel(dY, start, stop, th, tw, D, first, last):
    """``A g Aᵀ`` of the 2×2 output-gradient tiles ``g`` of the items ``[start, stop)``
    of ``dY`` (N, M, oh, ow) into ``D`` (16, M, (stop - start)·th·tw); rows and
    columns past the edge of ``dY`` read as zeros."""
    M, oh, ow = dY.shape[1], dY.shape[2], dY.shape[3]
    rows = np.zeros((2, 2 * tw), dtype=D.dtype)
    for i in range(start, stop):
        for m in range(first, last):
            for a in range(th):
                r = 2 * a
                if r + 2 <= oh and ow == 2 * tw:
                    g0, g1 = dY[i, m, r], dY[i, m, r + 1]
                else:
                    for k in range(2):
                        for q in range(2 * tw):
                            rows[k, q] = dY[i, m, r + k, q] if r + k < oh and q < ow else 0
                    g0, g1 = rows[0], rows[1]
                base = ((i - start) * th + a) * tw
                for b in range(tw):
                    t = base + b
                    # A g: rows g0, g0 + g1, g0 - g1, -g1 (columns u and v of each)
                    u0, v0 = g0[2 * b], g0[2 * b + 1]
                    u3, v3 = g1[2 * b], g1[2 * b + 1]
                    u1, v1 = u0 + u3, v0 + v3
                    u2, v2 = u0 - u3, v0 - v3
                    # (A g) Aᵀ: each row (u, v) to (u, u + v, u - v, -v)
                    D[0, m, t] = u0
                    D[1, m, t] = u0 + v0
                    D[2, m, t] = u0 - v0
                    D[3, m, t] = -v0
                    D[4, m, t] = u1
                    D[5, m, t] = u1 + v1
                    D[6, m, t] = u1 - v1
                    D[7, m, t] = -v1
                    D[8, m, t] = u2
                    D[9, m, t] = u2 + v2
                    D[10, m, t] = u2 - v2
                    D[11, m, t] = -v2
                    D[12, m, t] = -u3
                    D[13, m, t] = -u3 - v3
                    D[14, m, t] = v3 - u3
                    D[15, m, t] = v3


@compiled.kernel
def _grad_tiles_kernel4(dY, start, stop, th, tw, k, D, first, last):
    """``A g Aᵀ`` of F(4×4) of the 4×4 output-gradient tiles ``g`` of the items
    ``[start, stop)`` of ``dY`` (N, M, oh, ow) into ``D`` (36, M, (stop - start)·th·tw);
    rows and columns past the edge of ``dY`` read as zeros; ``k`` holds
    :func:`_constants`."""
    M, oh, ow = dY.shape[1], dY.shape[2], dY.shape[3]
    half, quarter, eighth, two, four, eight = k[0], k[1], k[2], k[5], k[6], k[7]
    rows = np.zeros((4, 4 * tw), dtype=D.dtype)
    Z = np.empty((6, 4), dtype=D.dtype)
    for i in range(start, stop):
        for m in range(first, last):
            for a in range(th):
                r = 4 * a
                if r + 4 <= oh and ow == 4 * tw:
                    g0, g1, g2, g3 = dY[i, m, r], dY[i, m, r + 1], dY[i, m, r + 2], dY[i, m, r + 3]
                else:
                    for h in range(4):
                        for q in range(4 * tw):
                            rows[h, q] = dY[i, m, r + h, q] if r + h < oh and q < ow else 0
                    g0, g1, g2, g3 = rows[0], rows[1], rows[2], rows[3]
                base = ((i - start) * th + a) * tw
                for b in range(tw):
                    t = base + b
                    for v in range(4):
                        # A g: the 6 rows of A times column v of the tile
                        q = 4 * b + v
                        u0, u1, u2, u3 = g0[q], g1[q], g2[q], g3[q]
                        s = u0 + u2
                        d = u1 + u3
                        Z[0, v] = u0
                        Z[1, v] = s + d
                        Z[2, v] = s - d
                        Z[3, v] = u0 + half * u1 + quarter * u2 + eighth * u3
                        Z[4, v] = u0 - two * u1 + four * u2 - eight * u3
                        Z[5, v] = u3
                    for h in range(6):
                        # (A g) Aᵀ: the same along each row
                        u0, u1, u2, u3 = Z[h, 0], Z[h, 1], Z[h, 2], Z[h, 3]
                        s = u0 + u2
                        d = u1 + u3
                        D[6 * h, m, t] = u0
                        D[6 * h + 1, m, t] = s + d
                        D[6 * h + 2, m, t] = s - d
                        D[6 * h + 3, m, t] = u0 + half * u1 + quarter * u2 + eighth * u3
                        D[6 * h + 4, m, t] = u0 - two * u1 + four * u2 - eight * u3
                        D[6 * h + 5, m, t] = u3


def _in_parts(kernel, channels, size, *args):
    """``kernel(*args, first, last)`` over ranges ``[first, last)`` of its ``channels``,
    in parts on the thread pool (by the shapes alone): a batch taken in one chunk
    transforms its tiles on every core too.  Inside a chunk that already runs on the
    pool the parts run one after another."""
    compiled.by_parts(channels, size, lambda first, last: kernel(*args, first, last),
                      key=(kernel.__name__, channels, size))


def _chunks(xp, N, C, count, th, tw, chunk):
    """Run ``chunk(part)`` over slices of the batch (see :data:`CHUNK_BUDGET`; ``count``
    planes of transformed tiles), on the thread pool for NumPy; returns the
    results in batch order."""
    per_item = th * tw
    step = max(1, CHUNK_BUDGET // (count * C * per_item), -(-MIN_TILES // per_item))
    return each(xp, [slice(i, min(i + step, N)) for i in range(0, N, step)], chunk,
                (chunk.__code__, N, C, count, th, tw))


def conv3x3(xp, Xp, W, out, adjoint=False):
    """Conv of an already padded input ``Xp`` (N, C, H+2, W+2) with a 3×3 ``W``,
    stride 1: ``(N, M, *out)``, by F(4×4, 3×3) or F(2×2, 3×3) (:func:`_tile`);
    where ``adjoint``, with ``W`` ``(C, M, 3, 3)`` flipped in space and its channel
    axes swapped (the Conv an input gradient is), read so from ``W`` as it lies.
    With compiled kernels the transforms read ``Xp`` and write ``Y`` in place
    (:func:`_input_kernel`, :func:`_output_kernel`); otherwise they are products
    with the Kronecker matrices.  The weight's transform is a product over every
    pair of channels, split on the pool when large."""
    N, C = Xp.shape[:2]
    M = W.shape[1] if adjoint else W.shape[0]
    oh, ow = out
    m = _tile(N, out)
    count = (m + 2) ** 2                                      # products, one per point
    th, tw = -(-oh // m), -(-ow // m)                         # tiles per column and row
    to_tiles, of_weight, from_tiles = _transforms(xp, Xp.dtype, m)
    if adjoint:  # the taps in reverse order; (count, C, M) planes read transposed
        U = matmul(xp, of_weight[:, ::-1], W.reshape(C * M, 9).T).reshape(count, C, M)
        U = xp.swapaxes(U, 1, 2)
    else:
        U = matmul(xp, of_weight, W.reshape(M * C, 9).T).reshape(count, M, C)
    if compiled.available(xp):
        Y = xp.empty((N, M, oh, ow), dtype=Xp.dtype)
        k = _constants(Xp.dtype)

        def chunk(part):
            T = (part.stop - part.start) * th * tw
            V = _planes(xp, count, C, T, Xp.dtype)
            _in_parts(_input_kernel, C, V.size, Xp, part.start, part.stop, m, th, tw, k, V)
            products = matmul(xp, U, V, out=_planes(xp, count, M, T, Xp.dtype))  # (count, M, T)
            _in_parts(_output_kernel, M, products.size, products, part.start, part.stop, m, th,
                      tw, k, Y)

        _chunks(xp, N, C, count, th, tw, chunk)
        return Y
    Xp = _grown(xp, Xp, m * th + 2, m * tw + 2)
    Y = xp.empty((N, M, m * th, m * tw), dtype=Xp.dtype)

    def chunk(part):
        V = _input_tiles(xp, Xp[part], to_tiles, m, th, tw)
        products = matmul(xp, U, V)                                  # (count, M, n·th·tw)
        Yt = xp.matmul(from_tiles, products.reshape(count, -1)).reshape(m, m, M, -1, th, tw)
        Y[part] = Yt.transpose(3, 2, 4, 0, 5, 1).reshape(-1, M, m * th, m * tw)

    _chunks(xp, N, C, count, th, tw, chunk)
    if m * th != oh or m * tw != ow:
        Y = xp.ascontiguousarray(Y[:, :, :oh, :ow])
    return Y


def weight_grad3x3(xp, dY, Xp):
    """dW ``(M, C, 3, 3)`` of a 3×3 stride-1 Conv of the padded input ``Xp`` given
    its output gradient ``dY`` (N, M, *out): the adjoint of :func:`conv3x3` in
    the weight (with the same tiles, :func:`_tile`), ``dW = Gᵀ [Σ_tiles (A dY_t Aᵀ)
    ⊙ (Bᵀ d_t B)] G``, that is (m+2)² products ``dŶ_ξ (M×tiles) @ V_ξᵀ (tiles×C)``
    summed over the chunks in batch order.  With compiled kernels both transforms
    read their arrays in place (:func:`_input_kernel`, :func:`_grad_tiles_kernel`
    or its F(4×4) form)."""
    N, M, oh, ow = dY.shape
    C = Xp.shape[1]
    m = _tile(N, (oh, ow))
    count = (m + 2) ** 2
    th, tw = -(-oh // m), -(-ow // m)
    to_tiles, of_weight, from_tiles = _transforms(xp, Xp.dtype, m)
    if compiled.available(xp):
        dtype = xp.result_type(dY.dtype, Xp.dtype)
        k = _constants(dtype)

        def chunk(part):
            T = (part.stop - part.start) * th * tw
            V = _planes(xp, count, C, T, Xp.dtype)
            dhat = _planes(xp, count, M, T, dtype)
            _in_parts(_input_kernel, C, V.size, Xp, part.start, part.stop, m, th, tw,
                      k.astype(Xp.dtype), V)
            if m == 4:
                _in_parts(_grad_tiles_kernel4, M, dhat.size, dY, part.start, part.stop, th, tw,
                          k, dhat)
            else:
                _in_parts(_grad_tiles_kernel, M, dhat.size, dY, part.start, part.stop, th, tw,
                          dhat)
            return matmul(xp, dhat, xp.swapaxes(V, 1, 2))            # (count, M, C)
    else:
        Xp = _grown(xp, Xp, m * th + 2, m * tw + 2)
        dY = _grown(xp, dY, m * th, m * tw)

        def chunk(part):
            V = _input_tiles(xp, Xp[part], to_tiles, m, th, tw)      # (count, C, T)
            d = dY[part]
            n = d.shape[0]
            blocks = xp.ascontiguousarray(                           # (m, m, M, n, th, tw)
                d.reshape(n, M, th, m, tw, m).transpose(3, 5, 1, 0, 2, 4)).reshape(m * m, -1)
            dhat = xp.matmul(from_tiles.T, blocks).reshape(count, M, -1)     # (count, M, T)
            return matmul(xp, dhat, xp.swapaxes(V, 1, 2))            # (count, M, C)

    dU = sum_in_order(_chunks(xp, N, C, count, th, tw, chunk))
    # dW's layout straight from the product (in parts when large), no transposing copy
    return matmul(xp, dU.reshape(count, -1).T, of_weight).reshape(M, C, 3, 3)

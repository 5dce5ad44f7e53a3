"""Tree ensembles of the ``ai.onnx.ml`` domain, forward only: TreeEnsembleRegressor and
TreeEnsembleClassifier (opset 1, with opset 3's ``*_as_tensor`` attributes) and
TreeEnsemble (opset 5).

A node's attributes are compiled once per node into a :class:`_Forest`: flat arrays
over the nodes of all its trees (feature, threshold, comparison, true and false child,
a leaf being its own child), each tree's root, the depth of the deepest tree, and each
leaf's weight for every target.  All rows then walk all trees together, one level per
step (a loop over depth, never over rows), in chunks of rows on the thread pool; the
leaves reached add their weights to each row's targets, or give their minimum or
maximum.  ``X`` declares no gradient: an ensemble is piecewise constant in ``X``.

Where the spec is silent, the kernels compute what onnxruntime computes:

- Features and thresholds compare in float64, which is exact for float32 features;
  integer features are cast to float32 first, as onnxruntime casts them.
- A NaN feature takes the true branch where ``nodes_missing_value_tracks_true`` is set,
  elsewhere what its comparison gives (false, except for BRANCH_NEQ).
- ``base_values`` are added after the aggregation.  A target that no reached leaf weighs
  scores 0, even with a base value; in a classifier a base value gives its class a score.
- A regressor with one target applies PROBIT alone of the post-transforms.
- A classifier with two labels and the weights of one class (scikit-learn's binary
  models) turns its score ``s`` into the columns ``[1 - s, s]`` when no weight is
  negative (the second label where ``s > 0.5``), else ``[-s, s]`` (the second label
  where ``s > 0``); under LOGISTIC into ``[logistic(-s), logistic(s)]``, under PROBIT
  into ``[probit(s), 0]``.  With weights for both classes, the second label wins
  where its score is positive.
- PROBIT is ``sqrt(2) * erfinv(2p - 1)`` with the approximation of erfinv that
  onnxruntime and onnx's reference use (Winitzki's, ``a = 0.147``).

TreeEnsemble (opset 5) keeps its own conventions: outputs in ``X``'s type, every
post-transform applied whatever the number of targets, and a target that no leaf
reached under MIN or MAX left at +inf or -inf.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from onnxgrad.errors import ModelError, ShapeError
from onnxgrad.ops.ml_linear import _class_labels
from onnxgrad.ops.registry import op
from onnxgrad.threads import each, split

ML = "ai.onnx.ml"

#: Node comparisons, numbered as TreeEnsemble's ``nodes_modes`` codes, then leaves.
_LEQ, _LT, _GTE, _GT, _EQ, _NEQ, _MEMBER, _LEAF = range(8)
_MODES = {"BRANCH_LEQ": _LEQ, "BRANCH_LT": _LT, "BRANCH_GTE": _GTE, "BRANCH_GT": _GT,
          "BRANCH_EQ": _EQ, "BRANCH_NEQ": _NEQ, "LEAF": _LEAF}
#: ``aggregate_function`` and ``post_transform`` values, in TreeEnsemble's code order.
_AGGREGATES = ("AVERAGE", "SUM", "MIN", "MAX")
_TRANSFORMS = ("NONE", "SOFTMAX", "LOGISTIC", "SOFTMAX_ZERO", "PROBIT")

#: Rows x trees x targets per chunk of rows, at most (the leaves' weights of a chunk).
_CHUNK = 1 << 18


# -- the compiled forest ------------------------------------------------------------------------
@dataclass
class _Forest:
    feature: Any       # (n,) int64, 0 at leaves
    threshold: Any     # (n,) float64
    mode: Any          # (n,) int64, one of _LEQ.._LEAF
    modes: tuple       # the comparisons (_LEQ.._NEQ) that branches use
    missing: Any       # (n,) bool: NaN goes to the true child; None when no node says so
    true_next: Any     # (n,) int64: a leaf is its own child
    false_next: Any
    roots: Any         # (T,) int64
    depth: int         # levels below the roots of the deepest tree
    max_feature: int   # the largest feature a branch reads (-1 without branches)
    members: dict      # BRANCH_MEMBER node -> its values
    leaf_row: Any      # (n,) int64: a leaf's row in weights and weighed
    weights: Any       # (L, K) float64: each leaf's weight per target (summed, or min/max)
    weighed: Any       # (L, K) bool: whether the leaf has a weight for the target


def _build(xp, where, *, feature, threshold, mode, missing, true_next, false_next, roots,
           weight_node, target, weight, n_out, combine, members=None) -> _Forest:
    """A :class:`_Forest` from flat node arrays; ``weight_node``/``target``/``weight``
    list each leaf weight (weights on branch nodes are ignored, as onnxruntime does)."""
    n = int(mode.shape[0])
    index = xp.arange(n, dtype=xp.int64)
    branch = mode != _LEAF
    for name, child in (("true", true_next), ("false", false_next)):
        bad = branch & ((child < 0) | (child >= n))
        if bool(bad.any()):
            raise ModelError(f"{where}: the {name} child of node {int(xp.argmax(bad))} does not "
                             "exist")
    if bool((branch & (feature < 0)).any()):
        raise ModelError(f"{where}: nodes_featureids must not be negative")
    true_next = xp.where(branch, true_next, index)
    false_next = xp.where(branch, false_next, index)
    depth, frontier = 0, roots
    while True:
        inner = frontier[branch[frontier]]
        if not inner.size:
            break
        depth += 1
        if depth > n:
            raise ModelError(f"{where}: a tree's nodes form a cycle (a node is its own "
                             "descendant)")
        frontier = xp.unique(xp.concatenate([true_next[inner], false_next[inner]]))
    if bool(((target < 0) | (target >= n_out)).any()):
        raise ModelError(f"{where}: target or class ids must lie in [0, {n_out}), got "
                         f"{sorted(set(int(t) for t in target.tolist()))}")
    leaf = ~branch
    leaf_row = xp.cumsum(leaf) - 1
    count = int(leaf.sum())
    keep = leaf[weight_node]
    cell = leaf_row[weight_node[keep]] * n_out + target[keep]
    weight = weight[keep]
    size = count * n_out
    if combine in ("SUM", "AVERAGE"):
        table = xp.bincount(cell, weights=weight, minlength=size).astype(xp.float64)
    else:  # the smallest (largest) weight of a leaf for a target
        table = xp.full(size, xp.inf if combine == "MIN" else -xp.inf)
        order = xp.argsort(weight if combine == "MIN" else -weight)
        cells, first = xp.unique(cell[order], return_index=True)
        table[cells] = weight[order][first]
    weighed = xp.bincount(cell, minlength=size) > 0
    used = [int(m) for m in xp.unique(mode[branch]).tolist()] if bool(branch.any()) else []
    return _Forest(
        feature=xp.where(branch, feature, 0), threshold=threshold, mode=mode,
        modes=tuple(m for m in used if m < _MEMBER),
        missing=missing if missing is not None and bool((missing & branch).any()) else None,
        true_next=true_next, false_next=false_next, roots=roots, depth=depth,
        max_feature=int(feature[branch].max()) if used else -1, members=members or {},
        leaf_row=xp.maximum(leaf_row, 0), weights=table.reshape(count, n_out),
        weighed=weighed.reshape(count, n_out))


_FORESTS: OrderedDict = OrderedDict()
_FORESTS_LIMIT = 64
_FORESTS_LOCK = threading.Lock()


def _cached(xp, ctx, make: Callable[[], Any]) -> Any:
    """``make()`` (a node's compiled forest), once per graph node and array module."""
    if ctx is None:
        return make()
    key = (id(ctx.node), xp.__name__)
    with _FORESTS_LOCK:
        entry = _FORESTS.get(key)
        if entry is not None and entry[0] is ctx.node:
            _FORESTS.move_to_end(key)
            return entry[1]
    forest = make()
    with _FORESTS_LOCK:
        _FORESTS[key] = (ctx.node, forest)
        if len(_FORESTS) > _FORESTS_LIMIT:
            _FORESTS.popitem(last=False)
    return forest


# -- evaluation ----------------------------------------------------------------------------------
def _compare(code, x, s):
    if code == _LEQ:
        return x <= s
    if code == _LT:
        return x < s
    if code == _GTE:
        return x >= s
    if code == _GT:
        return x > s
    if code == _EQ:
        return x == s
    return x != s


def _leaves(xp, forest: _Forest, X):
    """The leaf each row of ``X`` (n, F) reaches in each tree: (n, T) node indices."""
    node = xp.broadcast_to(forest.roots, (X.shape[0], forest.roots.shape[0]))
    for _ in range(forest.depth):
        x = xp.take_along_axis(X, forest.feature[node], axis=1)
        s = forest.threshold[node]
        if len(forest.modes) == 1:
            go = _compare(forest.modes[0], x, s)
        else:
            m = forest.mode[node]
            go = xp.zeros(node.shape, dtype=bool)
            for code in forest.modes:
                go = xp.where(m == code, _compare(code, x, s), go)
        for index, values in forest.members.items():
            go = xp.where(node == index, xp.isin(x, values), go)
        if forest.missing is not None:
            go = go | (forest.missing[node] & xp.isnan(x))
        node = xp.where(go, forest.true_next[node], forest.false_next[node])
    return node


def _aggregate(xp, forest: _Forest, X, combine: str):
    """Each row's aggregated weight per target (the sum for AVERAGE) and whether any
    reached leaf weighs the target: two (N, K) arrays."""
    trees, width = int(forest.roots.shape[0]), int(forest.weights.shape[1])

    def chunk(rows):
        leaf = forest.leaf_row[_leaves(xp, forest, X[rows])]
        w = forest.weights[leaf]  # (n, T, K)
        if combine == "MIN":
            total = w.min(axis=1)
        elif combine == "MAX":
            total = w.max(axis=1)
        else:
            total = w.sum(axis=1)
        return total, forest.weighed[leaf].any(axis=1)

    n = int(X.shape[0])
    if n == 0 or trees == 0:
        return xp.zeros((n, width)), xp.zeros((n, width), dtype=bool)
    parts = each(xp, split(n, -(-n * trees * max(width, 1) // _CHUNK)), chunk)
    if len(parts) == 1:
        return parts[0]
    return (xp.concatenate([p[0] for p in parts]), xp.concatenate([p[1] for p in parts]))


def _features(xp, X, where, forest: _Forest):
    """``X`` as a float64 matrix (a vector is one row), checked against the forest."""
    if X.ndim == 1:
        X = X.reshape(1, -1)
    elif X.ndim != 2:
        raise ShapeError(f"{where}: X must be a matrix (rows, features), got shape "
                         f"{tuple(X.shape)}")
    if X.dtype.kind in "biu":
        X = X.astype(xp.float32)
    elif X.dtype.kind != "f":
        raise ShapeError(f"{where}: X must hold numbers, got {X.dtype}")
    if forest.max_feature >= X.shape[1]:
        raise ShapeError(f"{where}: a node reads feature {forest.max_feature} but X has "
                         f"{X.shape[1]} features")
    return X.astype(xp.float64)


def _logistic(xp, v):
    e = 1 / (1 + xp.exp(-xp.abs(v)))
    return xp.where(v < 0, 1 - e, e)


def _probit(xp, p):
    """``sqrt(2) * erfinv(2p - 1)``, with Winitzki's approximation of erfinv, in float32
    as onnxruntime computes it (the approximation cancels digits near ``p = 0.5``)."""
    f = xp.float32
    x = 2 * p.astype(f) - 1
    inside = xp.abs(x) < 1
    x0 = xp.where(inside, x, f(0))
    log = xp.log((1 - x0) * (1 + x0))
    v = f(2 / (math.pi * 0.147)) + f(0.5) * log
    y = xp.sqrt(-v + xp.sqrt(v * v - log / f(0.147)))
    edge = xp.where(xp.abs(x) == 1, f(xp.inf), f(xp.nan))
    return f(math.sqrt(2)) * xp.where(x < 0, f(-1), f(1)) * xp.where(inside, y, edge)


def _transform(xp, V, kind: str):
    """The post-transform ``kind`` of scores ``V`` (N, K), as onnxruntime computes it."""
    if kind == "NONE":
        return V
    if kind == "LOGISTIC":
        return _logistic(xp, V)
    if kind == "PROBIT":
        return _probit(xp, V)
    top = V.max(axis=1, keepdims=True)
    if kind == "SOFTMAX":
        e = xp.exp(V - top)
        return e / e.sum(axis=1, keepdims=True)
    kept = xp.abs(V) > 1e-7  # SOFTMAX_ZERO: zero scores stay (nearly) zero
    e = xp.where(kept, xp.exp(V - top), V * xp.exp(-top))
    total = xp.where(kept, e, 0).sum(axis=1, keepdims=True)
    return xp.where(total > 0, e / xp.where(total > 0, total, 1), xp.nan)


# -- attributes ----------------------------------------------------------------------------------
def _where(ctx, name: str) -> str:
    return f"node {ctx.node.name!r} ({name})" if ctx is not None else name


def _choice(where, attr, value, options) -> str:
    if isinstance(value, bytes):
        value = value.decode()
    if value not in options:
        raise ModelError(f"{where}: {attr} must be one of {list(options)}, got {value!r}")
    return value


def _floats(xp, where, name, plain, tensor, *, required=True):
    """Attribute ``name`` given as a list of floats or as ``name_as_tensor``."""
    if plain is not None and tensor is not None:
        raise ModelError(f"{where}: give {name} or {name}_as_tensor, not both")
    values = plain if plain is not None else tensor
    if values is None:
        if required:
            raise ModelError(f"{where}: lacks {name} (or {name}_as_tensor)")
        return None
    return xp.asarray(values if tensor is None else values.reshape(-1)).astype(xp.float64)


def _ints(xp, where, name, values, length=None):
    if values is None:
        raise ModelError(f"{where}: lacks attribute {name}")
    out = xp.asarray(list(values), dtype=xp.int64)
    if length is not None and out.shape[0] != length:
        raise ModelError(f"{where}: {name} has {out.shape[0]} entries, nodes_modes {length}")
    return out


def _by_ids(xp, where, *, nodes_treeids, nodes_nodeids, nodes_featureids, nodes_modes,
            values, nodes_missing_value_tracks_true, nodes_truenodeids, nodes_falsenodeids,
            weight_treeids, weight_nodeids, weight_ids, weights, n_out, combine,
            prefix) -> _Forest:
    """The forest of TreeEnsembleRegressor/Classifier, whose nodes are named by
    (tree id, node id) and whose trees start at their first listed node."""
    if nodes_modes is None:
        raise ModelError(f"{where}: lacks attribute nodes_modes")
    names = [m.decode() if isinstance(m, bytes) else m for m in nodes_modes]
    unknown = sorted(set(names) - set(_MODES))
    if unknown:
        raise ModelError(f"{where}: nodes_modes must be among {list(_MODES)}, got {unknown}")
    n = len(names)
    mode = xp.asarray([_MODES[m] for m in names], dtype=xp.int64)
    tree = _ints(xp, where, "nodes_treeids", nodes_treeids, n)
    ids = _ints(xp, where, "nodes_nodeids", nodes_nodeids, n)
    if values is None:
        if any(m != "LEAF" for m in names):
            raise ModelError(f"{where}: lacks nodes_values (or nodes_values_as_tensor)")
        values = xp.zeros(n)
    if values.shape[0] != n:
        raise ModelError(f"{where}: nodes_values has {values.shape[0]} entries, nodes_modes {n}")
    missing = None
    if nodes_missing_value_tracks_true:
        flags = list(nodes_missing_value_tracks_true)[:n]
        missing = xp.asarray(flags + [0] * (n - len(flags)), dtype=xp.int64) == 1
    if n == 0:
        raise ModelError(f"{where}: the ensemble has no nodes")
    if bool((ids < 0).any()):
        raise ModelError(f"{where}: nodes_nodeids must not be negative")
    width = int(ids.max()) + 1
    key = tree * width + ids
    order = xp.argsort(key)
    keys = key[order]
    twice = keys[1:] == keys[:-1]
    if bool(twice.any()):
        j = int(order[int(xp.argmax(twice))])
        raise ModelError(f"{where}: node {int(ids[j])} of tree {int(tree[j])} is listed twice")

    def find(t, i, what):
        k = t * width + i
        pos = xp.minimum(xp.searchsorted(keys, k), n - 1)
        found = (i >= 0) & (i < width) & (keys[pos] == k)
        if not bool(found.all()):
            j = int(xp.argmin(found))
            raise ModelError(f"{where}: {what} names node {int(i[j])} of tree {int(t[j])}, "
                             "which nodes_nodeids does not list")
        return order[pos]

    branch = mode != _LEAF
    true_next = xp.zeros(n, dtype=xp.int64)
    false_next = xp.zeros(n, dtype=xp.int64)
    true_next[branch] = find(tree[branch], _ints(xp, where, "nodes_truenodeids",
                                                   nodes_truenodeids, n)[branch],
                             "nodes_truenodeids")
    false_next[branch] = find(tree[branch], _ints(xp, where, "nodes_falsenodeids",
                                                    nodes_falsenodeids, n)[branch],
                              "nodes_falsenodeids")
    _, first = xp.unique(tree, return_index=True)
    w_tree = _ints(xp, where, f"{prefix}_treeids", weight_treeids)
    w_node = _ints(xp, where, f"{prefix}_nodeids", weight_nodeids)
    target = _ints(xp, where, f"{prefix}_ids", weight_ids)
    if not w_tree.shape[0] == w_node.shape[0] == target.shape[0] == weights.shape[0]:
        raise ModelError(f"{where}: {prefix}_treeids, {prefix}_nodeids, {prefix}_ids and "
                         f"{prefix}_weights must have one entry per weight")
    return _build(xp, where, feature=_ints(xp, where, "nodes_featureids", nodes_featureids, n),
                  threshold=values, mode=mode, missing=missing, true_next=true_next,
                  false_next=false_next, roots=xp.sort(first).astype(xp.int64),
                  weight_node=find(w_tree, w_node, f"{prefix}_nodeids"), target=target,
                  weight=weights, n_out=n_out, combine=combine)


# -- TreeEnsembleRegressor ------------------------------------------------------------------
@op("TreeEnsembleRegressor", since=1, domain=ML)
def TreeEnsembleRegressor(xp, X, *, aggregate_function="SUM", base_values=None,
                          base_values_as_tensor=None, n_targets=None, nodes_falsenodeids=None,
                          nodes_featureids=None, nodes_hitrates=None,
                          nodes_hitrates_as_tensor=None, nodes_missing_value_tracks_true=None,
                          nodes_modes=None, nodes_nodeids=None, nodes_treeids=None,
                          nodes_truenodeids=None, nodes_values=None, nodes_values_as_tensor=None,
                          post_transform="NONE", target_ids=None, target_nodeids=None,
                          target_treeids=None, target_weights=None,
                          target_weights_as_tensor=None, ctx=None):
    """Each target's aggregate of the reached leaves' weights, plus its base value."""
    where = _where(ctx, "TreeEnsembleRegressor")
    combine = _choice(where, "aggregate_function", aggregate_function, _AGGREGATES)
    transform = _choice(where, "post_transform", post_transform, _TRANSFORMS)
    if n_targets is not None and int(n_targets) < 1:
        raise ModelError(f"{where}: n_targets must be positive, got {n_targets}")
    width = int(n_targets) if n_targets else max(list(target_ids or [0]), default=0) + 1
    forest = _cached(xp, ctx, lambda: _by_ids(
        xp, where, nodes_treeids=nodes_treeids, nodes_nodeids=nodes_nodeids,
        nodes_featureids=nodes_featureids, nodes_modes=nodes_modes,
        values=_floats(xp, where, "nodes_values", nodes_values, nodes_values_as_tensor,
                       required=False),
        nodes_missing_value_tracks_true=nodes_missing_value_tracks_true,
        nodes_truenodeids=nodes_truenodeids, nodes_falsenodeids=nodes_falsenodeids,
        weight_treeids=target_treeids, weight_nodeids=target_nodeids, weight_ids=target_ids,
        weights=_floats(xp, where, "target_weights", target_weights, target_weights_as_tensor),
        n_out=width, combine=combine, prefix="target"))
    base = _floats(xp, where, "base_values", base_values, base_values_as_tensor, required=False)
    if base is not None and base.shape[0] not in (0, width):
        raise ModelError(f"{where}: {base.shape[0]} base_values for {width} targets")
    origin = base if base is not None and base.shape[0] else 0
    S, hit = _aggregate(xp, forest, _features(xp, X, where, forest), combine)
    if combine == "AVERAGE":
        S = S / forest.roots.shape[0]
    S = S + origin
    if width == 1:  # as onnxruntime: a leaf without weight adds 0; PROBIT alone applies
        S = S if combine in ("SUM", "AVERAGE") else xp.where(hit, S, origin)
        return ((_probit(xp, S) if transform == "PROBIT" else S).astype(xp.float32),)
    return (_transform(xp, xp.where(hit, S, 0), transform).astype(xp.float32),)


# -- TreeEnsembleClassifier -----------------------------------------------------------------
@op("TreeEnsembleClassifier", since=1, domain=ML)
def TreeEnsembleClassifier(xp, X, *, base_values=None, base_values_as_tensor=None,
                           class_ids=None, class_nodeids=None, class_treeids=None,
                           class_weights=None, class_weights_as_tensor=None,
                           classlabels_int64s=None, classlabels_strings=None,
                           nodes_falsenodeids=None, nodes_featureids=None, nodes_hitrates=None,
                           nodes_hitrates_as_tensor=None, nodes_missing_value_tracks_true=None,
                           nodes_modes=None, nodes_nodeids=None, nodes_treeids=None,
                           nodes_truenodeids=None, nodes_values=None,
                           nodes_values_as_tensor=None, post_transform="NONE", ctx=None):
    """The labels and the class scores: the sum of the reached leaves' weights per class
    plus its base value, post-transformed."""
    where = _where(ctx, "TreeEnsembleClassifier")
    transform = _choice(where, "post_transform", post_transform, _TRANSFORMS)
    if classlabels_int64s and classlabels_strings:
        raise ModelError(f"{where}: give classlabels_int64s or classlabels_strings, not both")
    width = len(classlabels_int64s or classlabels_strings or [])
    if width < 2:
        raise ModelError(f"{where}: needs two or more class labels (classlabels_int64s or "
                         f"classlabels_strings), got {width}")

    def make():
        weights = _floats(xp, where, "class_weights", class_weights, class_weights_as_tensor)
        forest = _by_ids(
            xp, where, nodes_treeids=nodes_treeids, nodes_nodeids=nodes_nodeids,
            nodes_featureids=nodes_featureids, nodes_modes=nodes_modes,
            values=_floats(xp, where, "nodes_values", nodes_values, nodes_values_as_tensor,
                           required=False),
            nodes_missing_value_tracks_true=nodes_missing_value_tracks_true,
            nodes_truenodeids=nodes_truenodeids, nodes_falsenodeids=nodes_falsenodeids,
            weight_treeids=class_treeids, weight_nodeids=class_nodeids, weight_ids=class_ids,
            weights=weights, n_out=width, combine="SUM", prefix="class")
        # whether one class has all the weights, and whether none is negative
        return forest, len(set(list(class_ids or []))) == 1, not bool((weights < 0).any())

    forest, one_class, positive = _cached(xp, ctx, make)
    base = _floats(xp, where, "base_values", base_values, base_values_as_tensor, required=False)
    base = [] if base is None else [float(b) for b in base.tolist()]
    if len(base) not in ((0, 1, 2) if width == 2 else (0, width)):
        raise ModelError(f"{where}: {len(base)} base_values for {width} classes")
    S, hit = _aggregate(xp, forest, _features(xp, X, where, forest), "SUM")
    if width > 2:
        if base:
            S, hit = S + xp.asarray(base), xp.ones_like(hit)
        index = xp.argmax(xp.where(hit, S, -xp.inf), axis=1)
        scores = _transform(xp, xp.where(hit, S, 0), transform)
    else:
        index, scores = _binary(xp, S, hit, base, transform, one_class, positive)
    return _class_labels(xp, index, classlabels_int64s, classlabels_strings) + \
        (scores.astype(xp.float32),)


def _binary(xp, S, hit, base, transform, one_class, positive):
    """Labels (0 or 1) and the two score columns of a two-label classifier."""
    s0, s1, h0, h1 = S[:, 0], S[:, 1], hit[:, 0], hit[:, 1]
    second = xp.full(S.shape[0], -1)  # how one score becomes two, as in onnxruntime
    if len(base) == 2:  # the second class's score, when weighed, is base + the first's
        s0, s1 = (xp.where(h1, -(base[1] + s0), s0 + base[0]),
                  xp.where(h1, base[1] + s0, s1 + base[1]))
        single = xp.zeros(S.shape[0], dtype=bool)
    else:
        if base:
            s0 = s0 + base[0]
        else:
            second = xp.full(S.shape[0], 3)
        single = ~h1
    pos = xp.where(~single & h1, s1, xp.where(h0, s0, 0))
    if one_class:
        up = pos > (0.5 if positive else 0)
        second = xp.where(up, 0, 1) if positive else xp.where(up, 2, 3)
    else:
        up = pos > 0
    v0, v1 = xp.where(h0, s0, 0), xp.where(h1, s1, 0)
    pair = _transform(xp, xp.stack([v0, v1], axis=1), transform)
    if transform == "PROBIT":
        lo, hi = _probit(xp, v0), xp.zeros_like(v0)
    elif transform == "LOGISTIC":
        lo = xp.where(second < 0, v0, _logistic(xp, -v0))
        hi = xp.where(second < 0, 0, _logistic(xp, v0))
    else:
        lo = xp.where(second < 0, v0, xp.where(second <= 1, 1 - v0, -v0))
        hi = xp.where(second < 0, 0, v0)
    scores = xp.where(single[:, None], xp.stack([lo, hi], axis=1), pair)
    return up.astype(xp.int64), scores


# -- TreeEnsemble (opset 5) -------------------------------------------------------------------
@op("TreeEnsemble", since=5, domain=ML)
def TreeEnsemble(xp, X, *, leaf_targetids, leaf_weights, nodes_falseleafs, nodes_falsenodeids,
                 nodes_featureids, nodes_modes, nodes_splits, nodes_trueleafs, nodes_truenodeids,
                 tree_roots, aggregate_function=1, membership_values=None, n_targets=None,
                 nodes_hitrates=None, nodes_missing_value_tracks_true=None, post_transform=0,
                 ctx=None):
    """Nodes index nodes or leaves (``nodes_trueleafs``/``nodes_falseleafs``); each leaf
    has one weight for one target."""
    where = _where(ctx, "TreeEnsemble")
    if aggregate_function not in range(4) or post_transform not in range(5):
        raise ModelError(f"{where}: aggregate_function must be 0-3 and post_transform 0-4, "
                         f"got {aggregate_function} and {post_transform}")
    combine = _AGGREGATES[aggregate_function]
    targets = xp.asarray(leaf_targetids, dtype=xp.int64)
    width = int(n_targets) if n_targets else int(targets.max()) + 1
    forest = _cached(xp, ctx, lambda: _flat(
        xp, where, leaf_targetids=targets, leaf_weights=leaf_weights,
        nodes_falseleafs=nodes_falseleafs, nodes_falsenodeids=nodes_falsenodeids,
        nodes_featureids=nodes_featureids, nodes_modes=nodes_modes, nodes_splits=nodes_splits,
        nodes_trueleafs=nodes_trueleafs, nodes_truenodeids=nodes_truenodeids,
        tree_roots=tree_roots, membership_values=membership_values,
        nodes_missing_value_tracks_true=nodes_missing_value_tracks_true, n_out=width,
        combine=combine))
    if X.ndim != 2:
        raise ShapeError(f"{where}: X must be a matrix (rows, features), got shape "
                         f"{tuple(X.shape)}")
    S, hit = _aggregate(xp, forest, _features(xp, X, where, forest), combine)
    if combine == "AVERAGE":
        S = S / forest.roots.shape[0]
    elif combine in ("MIN", "MAX"):
        S = xp.where(hit, S, xp.inf if combine == "MIN" else -xp.inf)
    return (_transform(xp, S, _TRANSFORMS[post_transform]).astype(X.dtype),)


def _flat(xp, where, *, leaf_targetids, leaf_weights, nodes_falseleafs, nodes_falsenodeids,
          nodes_featureids, nodes_modes, nodes_splits, nodes_trueleafs, nodes_truenodeids,
          tree_roots, membership_values, nodes_missing_value_tracks_true, n_out, combine):
    """TreeEnsemble's nodes followed by its leaves, as one forest."""
    codes = [int(m) for m in nodes_modes.reshape(-1).tolist()]
    if any(not 0 <= m <= _MEMBER for m in codes):
        raise ModelError(f"{where}: nodes_modes must be codes 0-6, got {sorted(set(codes))}")
    n, leaves = len(codes), int(leaf_weights.size)
    zeros = xp.zeros(leaves, dtype=xp.int64)

    def child(ids, is_leaf, name):
        ids, is_leaf = xp.asarray(ids, dtype=xp.int64), xp.asarray(is_leaf, dtype=bool)
        if bool((ids < 0).any() | (is_leaf & (ids >= leaves)).any()
                | (~is_leaf & (ids >= n)).any()):
            raise ModelError(f"{where}: {name} points past the {n} nodes or {leaves} leaves")
        return xp.concatenate([xp.where(is_leaf, ids + n, ids), zeros])

    missing = None
    if nodes_missing_value_tracks_true is not None:
        missing = xp.concatenate([xp.asarray(nodes_missing_value_tracks_true, dtype=bool),
                                  xp.zeros(leaves, dtype=bool)])
    roots = xp.asarray(tree_roots, dtype=xp.int64)
    if bool(((roots < 0) | (roots >= n)).any()):
        raise ModelError(f"{where}: tree_roots must index the {n} nodes")
    members = {i: xp.asarray(v, dtype=xp.float64)
               for i, v in _member_sets(where, codes, membership_values).items()}
    return _build(
        xp, where,
        feature=xp.concatenate([xp.asarray(nodes_featureids, dtype=xp.int64), zeros]),
        threshold=xp.concatenate([xp.asarray(nodes_splits).astype(xp.float64).reshape(-1),
                                  xp.zeros(leaves)]),
        mode=xp.asarray(codes + [_LEAF] * leaves, dtype=xp.int64), missing=missing,
        true_next=child(nodes_truenodeids, nodes_trueleafs, "nodes_truenodeids"),
        false_next=child(nodes_falsenodeids, nodes_falseleafs, "nodes_falsenodeids"),
        roots=roots, weight_node=xp.arange(n, n + leaves, dtype=xp.int64),
        target=leaf_targetids, weight=xp.asarray(leaf_weights).astype(xp.float64).reshape(-1),
        n_out=n_out, combine=combine, members=members)


def _member_sets(where, modes, membership_values) -> dict:
    """Node index -> its member values, in the order the MEMBER nodes appear."""
    member_nodes = [i for i, m in enumerate(modes) if m == _MEMBER]
    if not member_nodes:
        return {}
    if membership_values is None:
        raise ModelError(f"{where}: BRANCH_MEMBER nodes need membership_values")
    sets, current = [], []
    for v in membership_values.reshape(-1).tolist():
        if v != v:  # NaN ends a set
            sets.append(current)
            current = []
        else:
            current.append(v)
    if current:
        sets.append(current)
    if len(sets) < len(member_nodes):
        raise ModelError(f"{where}: {len(member_nodes)} BRANCH_MEMBER nodes but "
                         f"{len(sets)} sets in membership_values")
    return dict(zip(member_nodes, sets))

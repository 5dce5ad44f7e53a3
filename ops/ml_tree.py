"""Tree ensembles of the ``ai.onnx.ml`` domain: TreeEnsemble (opset 5).  Forward only.

All rows walk each tree together, one level per step; each leaf reached adds
its weight to its target (or takes the minimum or maximum, per
``aggregate_function``), then ``post_transform`` applies (PROBIT is refused).
"""

from __future__ import annotations

from onnxgrad.errors import ModelError
from onnxgrad.ops.registry import op

ML = "ai.onnx.ml"

#: The node modes (``nodes_modes``): BRANCH_LEQ, BRANCH_LT, BRANCH_GTE, BRANCH_GT,
#: BRANCH_EQ, BRANCH_NEQ and BRANCH_MEMBER.
_LEQ, _LT, _GTE, _GT, _EQ, _NEQ, _MEMBER = range(7)


@op("TreeEnsemble", since=5, domain=ML)
def TreeEnsemble(xp, X, *, leaf_targetids, leaf_weights, nodes_falseleafs, nodes_falsenodeids,
                 nodes_featureids, nodes_modes, nodes_splits, nodes_trueleafs, nodes_truenodeids,
                 tree_roots, aggregate_function=1, membership_values=None, n_targets=None,
                 nodes_hitrates=None, nodes_missing_value_tracks_true=None, post_transform=0):
    """All rows walk each tree together, one level per step; leaves add to their target."""
    modes = [int(m) for m in nodes_modes.reshape(-1).tolist()]
    splits = xp.asarray(nodes_splits).astype(xp.float64).reshape(-1)
    feature = xp.asarray(nodes_featureids, dtype=xp.int64)
    true_id = xp.asarray(nodes_truenodeids, dtype=xp.int64)
    false_id = xp.asarray(nodes_falsenodeids, dtype=xp.int64)
    true_leaf = xp.asarray(nodes_trueleafs, dtype=bool)
    false_leaf = xp.asarray(nodes_falseleafs, dtype=bool)
    missing = xp.zeros(len(modes), dtype=bool) if nodes_missing_value_tracks_true is None \
        else xp.asarray(nodes_missing_value_tracks_true, dtype=bool)
    weights = xp.asarray(leaf_weights).astype(xp.float64).reshape(-1)
    targets = xp.asarray(leaf_targetids, dtype=xp.int64)
    mode = xp.asarray(modes, dtype=xp.int64)
    members = _member_sets(modes, membership_values)
    data = X.astype(xp.float64)
    rows = xp.arange(X.shape[0])
    n_out = int(n_targets) if n_targets else int(targets.max()) + 1
    if aggregate_function in (0, 1):
        total = xp.zeros((X.shape[0], n_out))
    elif aggregate_function in (2, 3):
        total = xp.full((X.shape[0], n_out), xp.inf if aggregate_function == 2 else -xp.inf)
    else:
        raise ModelError(f"TreeEnsemble: unknown aggregate_function {aggregate_function}")
    for root in tree_roots:
        node = xp.full(X.shape[0], int(root), dtype=xp.int64)
        done = xp.zeros(X.shape[0], dtype=bool)
        for _ in range(len(modes) + 1):
            if bool(done.all()):
                break
            cur = xp.where(done, int(tree_roots[0]), node)  # leaf indices are not node indices
            x = data[rows, feature[cur]]
            s, m = splits[cur], mode[cur]
            go = xp.select([m == _LEQ, m == _LT, m == _GTE, m == _GT, m == _EQ, m == _NEQ],
                           [x <= s, x < s, x >= s, x > s, x == s, x != s], False)
            if members:
                for index, values in members.items():
                    go = xp.where(cur == index, xp.isin(x, values), go)
            go = go | (missing[cur] & xp.isnan(x))
            leaf = xp.where(go, true_leaf[cur], false_leaf[cur])
            nxt = xp.where(go, true_id[cur], false_id[cur])
            node = xp.where(done, node, nxt)
            done = done | leaf
        else:
            raise ModelError("TreeEnsemble: a tree does not end in leaves")
        w, t = weights[node], targets[node]
        if aggregate_function in (0, 1):
            xp.add.at(total, (rows, t), w)
        elif aggregate_function == 2:
            xp.minimum.at(total, (rows, t), w)
        else:
            xp.maximum.at(total, (rows, t), w)
    if aggregate_function == 0:
        total = total / len(tree_roots)
    return (_post_transform(xp, total, post_transform).astype(X.dtype),)


def _member_sets(modes, membership_values) -> dict:
    """Node index -> its member values, in the order the MEMBER nodes appear."""
    member_nodes = [i for i, m in enumerate(modes) if m == _MEMBER]
    if not member_nodes:
        return {}
    if membership_values is None:
        raise ModelError("TreeEnsemble: BRANCH_MEMBER nodes need membership_values")
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
        raise ModelError(f"TreeEnsemble: {len(member_nodes)} membership nodes, {len(sets)} sets")
    return dict(zip(member_nodes, sets))


def _post_transform(xp, y, kind):
    if kind == 0:
        return y
    if kind in (1, 3):  # softmax (SOFTMAX_ZERO keeps zero scores at zero)
        e = xp.exp(y - y.max(axis=1, keepdims=True))
        if kind == 3:
            e = xp.where(y == 0, 0, e)
        return e / xp.maximum(e.sum(axis=1, keepdims=True), 1e-300)
    if kind == 2:
        return 1 / (1 + xp.exp(-y))
    raise ModelError(f"TreeEnsemble: post_transform {kind} (PROBIT) is not supported")

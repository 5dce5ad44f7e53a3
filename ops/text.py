"""Strings and text features: StringConcat, StringSplit, StringNormalizer,
RegexFullMatch and TfIdfVectorizer.

String tensors are NumPy object arrays of ``str`` (ONNX's STRING type); they
live on the host only.  Forward only.
"""

from __future__ import annotations

import re
import unicodedata

from onnxgrad.errors import ModelError
from onnxgrad.ops.registry import op


def _strings(x, op_name: str):
    if x.dtype.kind not in "OUS":
        raise ModelError(f"{op_name} needs a string tensor, got {x.dtype}")
    return x


def _map(xp, x, fn, dtype=object):
    flat = [fn(v) for v in x.reshape(-1).tolist()]
    out = xp.empty(len(flat), dtype=dtype)
    out[:] = flat
    return out.reshape(x.shape)


@op("StringConcat", since=20)
def StringConcat(xp, X, Y):
    _strings(X, "StringConcat"), _strings(Y, "StringConcat")
    a, b = xp.broadcast_arrays(X, Y)
    pairs = [str(u) + str(v) for u, v in zip(a.reshape(-1).tolist(), b.reshape(-1).tolist())]
    out = xp.empty(len(pairs), dtype=object)
    out[:] = pairs
    return (out.reshape(a.shape),)


@op("RegexFullMatch", since=20)
def RegexFullMatch(xp, X, *, pattern=None):
    _strings(X, "RegexFullMatch")
    try:
        regex = re.compile(pattern or "")
    except re.error as exc:
        raise ModelError(f"RegexFullMatch: invalid pattern {pattern!r} ({exc})") from exc
    return (_map(xp, X, lambda s: regex.fullmatch(str(s)) is not None, dtype=bool),)


@op("StringSplit", since=20)
def StringSplit(xp, X, *, delimiter=None, maxsplit=None):
    _strings(X, "StringSplit")
    sep = delimiter or None  # empty or absent: runs of whitespace
    limit = -1 if maxsplit is None else int(maxsplit)
    parts = [str(s).split(sep, limit) for s in X.reshape(-1).tolist()]
    width = max((len(p) for p in parts), default=0)
    Y = xp.empty((len(parts), width), dtype=object)
    for i, p in enumerate(parts):
        Y[i] = p + [""] * (width - len(p))
    Z = xp.asarray([len(p) for p in parts], dtype=xp.int64)
    return Y.reshape(tuple(X.shape) + (width,)), Z.reshape(X.shape)


def _strip_accents(s: str) -> str:
    if s.isascii():
        return s
    return "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))


@op("StringNormalizer", since=10)
def StringNormalizer(xp, X, *, case_change_action="NONE", is_case_sensitive=0, locale=None,
                     stopwords=None):
    """Case folding and stop-word removal on a [C] or [1, C] tensor; empty results are dropped."""
    _strings(X, "StringNormalizer")
    if X.ndim not in (1, 2) or (X.ndim == 2 and X.shape[0] != 1):
        raise ModelError(f"StringNormalizer needs a [C] or [1, C] input, got {list(X.shape)}")
    if case_change_action not in ("NONE", "LOWER", "UPPER"):
        raise ModelError(f"StringNormalizer: unknown case_change_action {case_change_action!r}")
    change = {"LOWER": str.lower, "UPPER": str.upper}.get(case_change_action, lambda s: s)
    stops = set(stopwords or ())
    if not is_case_sensitive:
        stops = {change(w) for w in stops}

    def drop(s: str) -> str:
        return " ".join(w for w in s.split(" ") if w not in stops) if stops else s

    out = []
    for s in X.reshape(-1).tolist():
        s = _strip_accents(s if isinstance(s, str) else "")
        s = change(drop(s)) if is_case_sensitive else drop(change(s))
        if s:
            out.append(s)
    if not out:
        out = [""]
    Y = xp.empty(len(out), dtype=object)
    Y[:] = out
    return (Y.reshape((1, -1)) if X.ndim == 2 else Y,)


# -- TfIdfVectorizer ------------------------------------------------------------------------
def _ngram_table(pool, ngram_counts, ngram_indexes, min_n, max_n):
    """{n-gram tuple: output column} for the n-grams of lengths min_n..max_n in the pool."""
    table: dict[tuple, int] = {}
    k = 0
    bounds = list(ngram_counts) + [len(pool)]
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
        for i in range(start, end - n + 1, n):
            if min_n <= n <= max_n:
                table.setdefault(tuple(pool[i:i + n]), int(ngram_indexes[k]))
            k += 1
    return table


@op("TfIdfVectorizer", since=9)
def TfIdfVectorizer(xp, X, *, max_gram_length, max_skip_count, min_gram_length, mode,
                    ngram_counts, ngram_indexes, pool_int64s=None, pool_strings=None,
                    weights=None):
    if mode not in ("TF", "IDF", "TFIDF"):
        raise ModelError(f"TfIdfVectorizer: unknown mode {mode!r}")
    pool = list(pool_strings if pool_strings else pool_int64s or [])
    table = _ngram_table(pool, ngram_counts, ngram_indexes, min_gram_length, max_gram_length)
    width = max(int(i) for i in ngram_indexes) + 1
    rows = X.reshape(1, -1).tolist() if X.ndim <= 1 else X.tolist()
    counts = [[0.0] * width for _ in rows]
    for r, row in enumerate(rows):
        for skip in range(1, max_skip_count + 2):
            # Unigrams are counted once, not once per skip distance.
            lowest = max(min_gram_length, 1 if skip == 1 else 2)
            for n in range(lowest, max_gram_length + 1):
                for s in range(len(row) - (n - 1) * skip):
                    column = table.get(tuple(row[s:s + (n - 1) * skip + 1:skip]))
                    if column is not None:
                        counts[r][column] += 1
    tf = xp.asarray(counts, dtype=xp.float32)
    w = None if weights is None or len(weights) == 0 else xp.asarray(weights, dtype=xp.float32)
    if mode == "TF":
        out = tf
    elif mode == "IDF":
        out = (tf > 0).astype(xp.float32) * (1 if w is None else w)
    else:
        out = tf * (1 if w is None else w)
    return (out.reshape(-1) if X.ndim <= 1 else out,)

"""Random numbers: RandomNormal, RandomUniform, their ``*Like`` forms, Bernoulli
and Multinomial.

Without a ``seed`` a node draws from the run's generator (``ctx.rng``, seeded
by the trainer).  With one, the node owns a generator made from that seed
when the node first runs, so a freshly loaded model repeats its sequence;
later runs continue it, as in onnxruntime.  No two runtimes share a random
stream, so only shapes, types and statistics can be compared with another
runtime.  Nothing here is differentiable.
"""

from __future__ import annotations

from collections import OrderedDict

from onnxgrad.errors import ModelError
from onnxgrad.ops.registry import op

_GENERATORS: OrderedDict[tuple, tuple] = OrderedDict()
_LIMIT = 1024


def _rng(xp, ctx, seed):
    if seed is None:
        return ctx.rng
    key = (id(ctx.node), id(ctx.state))
    entry = _GENERATORS.get(key)
    if entry is not None and entry[0] is ctx.node and entry[1] is ctx.state:
        return entry[2]
    generator = xp.random.default_rng(int(seed))
    _GENERATORS[key] = (ctx.node, ctx.state, generator)
    if len(_GENERATORS) > _LIMIT:
        _GENERATORS.popitem(last=False)
    return generator


def _dtype(xp, code, like=None):
    if code is None:
        if like is None:
            raise ModelError("no dtype attribute and no input to take the type from")
        return like.dtype
    from onnx.helper import tensor_dtype_to_np_dtype  # noqa: PLC0415 - type codes only

    return xp.dtype(tensor_dtype_to_np_dtype(int(code)))


def _work(xp, dtype):
    """The type a generator draws in for ``dtype`` (float32 or float64)."""
    return xp.float64 if dtype == xp.float64 else xp.float32


def _normal(xp, rng, shape, dtype, mean, scale):
    x = rng.standard_normal(size=tuple(shape), dtype=_work(xp, dtype))
    return (x * scale + mean).astype(dtype)


def _uniform(xp, rng, shape, dtype, low, high):
    x = rng.random(size=tuple(shape), dtype=_work(xp, dtype))
    return (x * (high - low) + low).astype(dtype)


@op("RandomNormal", since=1)
def RandomNormal(xp, *, shape, dtype=1, mean=0.0, scale=1.0, seed=None, ctx):
    return (_normal(xp, _rng(xp, ctx, seed), shape, _dtype(xp, dtype), mean, scale),)


@op("RandomUniform", since=1)
def RandomUniform(xp, *, shape, dtype=1, high=1.0, low=0.0, seed=None, ctx):
    return (_uniform(xp, _rng(xp, ctx, seed), shape, _dtype(xp, dtype), low, high),)


@op("RandomNormalLike", since=1)
def RandomNormalLike(xp, input, *, dtype=None, mean=0.0, scale=1.0, seed=None, ctx):
    return (_normal(xp, _rng(xp, ctx, seed), input.shape, _dtype(xp, dtype, input), mean,
                    scale),)


@op("RandomUniformLike", since=1)
def RandomUniformLike(xp, input, *, dtype=None, high=1.0, low=0.0, seed=None, ctx):
    return (_uniform(xp, _rng(xp, ctx, seed), input.shape, _dtype(xp, dtype, input), low,
                     high),)


@op("Bernoulli", since=15)
def Bernoulli(xp, input, *, dtype=None, seed=None, ctx):
    u = _rng(xp, ctx, seed).random(size=input.shape, dtype=xp.float64)
    return ((u < input).astype(_dtype(xp, dtype, input)),)


@op("Multinomial", since=7)
def Multinomial(xp, input, *, dtype=6, sample_size=1, seed=None, ctx):
    """``sample_size`` class indices per row of unnormalized log-probabilities [batch, classes]."""
    if input.ndim != 2:
        raise ModelError(f"Multinomial needs a [batch, classes] input, got {list(input.shape)}")
    logits = input.astype(xp.float64)
    p = xp.exp(logits - logits.max(axis=1, keepdims=True))
    cdf = xp.cumsum(p, axis=1)
    cdf = cdf / cdf[:, -1:]
    u = _rng(xp, ctx, seed).random(size=(input.shape[0], sample_size), dtype=xp.float64)
    index = (u[:, :, None] >= cdf[:, None, :]).sum(axis=2)
    index = xp.minimum(index, input.shape[1] - 1)
    return (index.astype(_dtype(xp, dtype)),)

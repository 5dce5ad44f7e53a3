"""Every op onnxgrad knows: forward kernels, differentiable inputs, gradient rules.

Importing this package registers all op families; :func:`lookup` finds the
declaration of an op for a given domain and opset.
"""

from onnxgrad.ops.registry import (  # noqa: F401
    REQUIRED,
    OpDef,
    canonical_domain,
    is_registered,
    lookup,
    op,
    registered_ops,
)

# Op families register themselves on import.
from onnxgrad.ops import (  # noqa: F401,E402
    activation,
    elementwise,
    linalg,
    loss,
    ml,
    reduce,
    shape,
    conv, dropout, nonlinear, normalization, pool, resize,  # CNN ops
    attention, indexing, logic, math, reduce_ext, tensor,  # transformer and index ops
    castlike, control, detection, grid, misc, ml_extra, preview_training, quantize, random,
    rnn, sequence, signal, text,  # conformance
    cumprod, deform_conv, flex_attention, gated, linear_attention, pool_extra, rotary,
    scatter_extra,  # conformance follow-ups
    ml_linear, ml_svm,  # ai.onnx.ml linear models, scalers and SVMs
)

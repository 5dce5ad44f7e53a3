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
    attention, indexing, logic, math, tensor,  # transformer and index ops
    castlike, control, detection, grid, preview_training, quantize, random,
    rnn, sequence, signal, text,  # conformance
    deform_conv, flex_attention, gated, linear_attention, rotary,  # conformance follow-ups
    ml_linear, ml_svm, ml_tree,  # ai.onnx.ml linear models, scalers, SVMs and tree ensembles
    ml_maps,  # ai.onnx.ml ZipMap, DictVectorizer and CastMap
)

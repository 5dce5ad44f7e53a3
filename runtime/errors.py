"""The exceptions onnxgrad raises.

Every error a user can meet is an :class:`OnnxgradError`. Messages name the
file, node, tensor or data key involved and say what was expected, so that a
command-line tool can print ``str(err)`` on one line and exit.
"""

from __future__ import annotations


class OnnxgradError(Exception):
    """Base class of every error raised by onnxgrad."""


class ModelError(OnnxgradError):
    """The model file or graph is invalid, or cannot be used as asked."""


class UnsupportedOpError(OnnxgradError):
    """An op (or its gradient) is not implemented for the model's opset."""

    def __init__(self, op_type: str, domain: str, opset: int, node: str, what: str = "forward kernel"):
        self.op_type, self.domain, self.opset, self.node = op_type, domain, opset, node
        dom = domain or "ai.onnx"
        super().__init__(
            f"{what} for op {op_type!r} (domain {dom!r}, opset {opset}) is not supported; "
            f"needed by node {node!r}"
        )


class ShapeError(OnnxgradError):
    """A tensor's shape does not fit where it is used."""


class DataError(OnnxgradError):
    """Input data (feeds, targets, data files) does not fit the model."""


class CheckpointError(OnnxgradError):
    """A checkpoint cannot be written or read."""


class NonFiniteError(OnnxgradError):
    """A training step's loss is not finite (NaN or infinite)."""


__all__ = [
    "OnnxgradError",
    "ModelError",
    "UnsupportedOpError",
    "ShapeError",
    "DataError",
    "CheckpointError",
    "NonFiniteError",
]

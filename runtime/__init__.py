"""onnxgrad: train ONNX models with backpropagation, on NumPy or CuPy.

    import onnxgrad
    model = onnxgrad.load("model.onnx")
    trainer = onnxgrad.Trainer(model, loss="cross_entropy",
                               optimizer=onnxgrad.SGD(lr=0.01, momentum=0.9))
    loss = trainer.step({"input": x}, y)
    trainer.model.save("trained.onnx")
"""

from onnxgrad.errors import (
    CheckpointError,
    DataError,
    ModelError,
    OnnxgradError,
    ShapeError,
    UnsupportedOpError,
)
from onnxgrad.losses import LOSSES
from onnxgrad.model import Model, load
from onnxgrad.optimizers import SGD, Adam, AdamW, Optimizer
from onnxgrad.trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "load", "Model", "Trainer", "SGD", "Adam", "AdamW", "Optimizer", "LOSSES",
    "OnnxgradError", "ModelError", "UnsupportedOpError", "ShapeError", "DataError",
    "CheckpointError",
]

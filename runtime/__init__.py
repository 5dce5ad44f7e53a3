"""onnxgrad: train ONNX models with backpropagation, on NumPy or CuPy.

    import onnxgrad
    model = onnxgrad.load("model.onnx")
    trainer = onnxgrad.Trainer(model, loss="cross_entropy",
                               optimizer=onnxgrad.SGD(lr=0.01, momentum=0.9))
    loss = trainer.step({"input": x}, y)
    trainer.model.save("trained.onnx")
"""

from onnxgrad import checkpoint  # noqa: F401 - onnxgrad.checkpoint.load/save
from onnxgrad import distributed  # noqa: F401 - onnxgrad.distributed.MPIComm, NCCLComm
from onnxgrad.errors import (
    CheckpointError,
    DataError,
    ModelError,
    NonFiniteError,
    OnnxgradError,
    ShapeError,
    UnsupportedOpError,
)
from onnxgrad.losses import BCEWithLogits, CrossEntropy, L1, LOSSES, MSE, NLL, Loss
from onnxgrad.model import Model, load
from onnxgrad.optimizers import SGD, Adam, AdamW, Optimizer
from onnxgrad.profile import Profile
from onnxgrad.schedules import (
    CosineAnnealingLR,
    ExponentialLR,
    LinearWarmupDecay,
    MultiStepLR,
    OneCycleLR,
    Schedule,
    StepLR,
)
from onnxgrad.trainer import Trainer
from onnxgrad.threads import get_num_threads, set_num_threads
from onnxgrad.training_info import TrainingInfo

__version__ = "0.1.0"

__all__ = [
    "load", "Model", "Trainer", "Profile", "TrainingInfo", "SGD", "Adam", "AdamW", "Optimizer",
    "LOSSES", "Loss", "CrossEntropy", "NLL", "MSE", "L1", "BCEWithLogits",
    "OnnxgradError", "ModelError", "UnsupportedOpError", "ShapeError", "DataError",
    "CheckpointError", "NonFiniteError", "set_num_threads", "get_num_threads",
    "Schedule", "StepLR", "MultiStepLR", "ExponentialLR", "CosineAnnealingLR",
    "LinearWarmupDecay", "OneCycleLR",
]

"""Shared test configuration: tests marked ``gpu`` skip where no CUDA device exists."""

import pytest

from onnxgrad.backend import cuda_available


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

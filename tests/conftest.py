import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. The switch is read when triton is first imported,
# so it is set here, before any test module imports the kernels (a per-module switch breaks with test ordering).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests run offline, always.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
torch.set_num_threads(1)  # tiny models: one thread is fastest and immune to oversubscription


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

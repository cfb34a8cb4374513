import os

# No model hub and no lookups off this machine (ENVIRONMENT.md): set before anything imports huggingface_hub.
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)

import pytest
import torch

# One thread: on a 2-core machine torch's default of 2 threads per process makes tiny models 100x slower as
# soon as anything else runs (measured: a tiny SD3 forward 0.36 s vs 2 ms).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

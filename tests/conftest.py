import os

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))
os.environ.setdefault("NEUROSPEC_NO_PROGRESS", "1")


def pytest_collection_modifyitems(config, items):
    # Real-model tests are part of the suite; NEUROSPEC_SKIP_SLOW=1 leaves them out for quick local loops.
    if os.environ.get("NEUROSPEC_SKIP_SLOW"):
        skip = pytest.mark.skip(reason="NEUROSPEC_SKIP_SLOW is set")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    """A tiny Llama with the character tokenizer saved as a model directory (neurospec cache in tmp_path)."""
    from tiny import save_tiny_lm

    monkeypatch.setenv("NEUROSPEC_CACHE", str(tmp_path / "cache"))
    return save_tiny_lm(tmp_path / "tiny")


@pytest.fixture(params=[1, 3])
def threads(request, monkeypatch):
    """Run the CPU kernels on one thread, and split across three column ranges even for small inputs."""
    from neurospec.record import kernels

    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    monkeypatch.setattr(kernels, "_MIN_PER_THREAD", 1)
    yield request.param
    torch.set_num_threads(old)

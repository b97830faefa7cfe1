import pytest
import torch

from labpipe.device import DeviceError, resolve_device


def test_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_but_absent_says_why():
    expected = "CPU-only build" if torch.version.cuda is None else "sees no GPU"
    with pytest.raises(DeviceError, match=f"device=cuda was requested.*{expected}"):
        resolve_device("cuda")


def test_unknown_device():
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")

"""Device choice, with a clear error when CUDA is asked for but absent."""

from __future__ import annotations

import torch

from labpipe.errors import UserError


class DeviceError(UserError, RuntimeError):
    exit_code = 1


def resolve_device(name: str, key: str = "device") -> torch.device:
    """'auto' -> cuda when present (else mps, else cpu); 'cuda'/'cuda:N'/'mps'/'cpu' must be available.
    `key` is the param that asked for it, named in the error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if torch.version.cuda is None:
            raise DeviceError(
                f"{key}={name} was requested, but the installed torch {torch.__version__} is a CPU-only build. "
                "Install a CUDA build of torch (the Docker image has one) or set device=cpu/auto."
            )
        if not torch.cuda.is_available():
            raise DeviceError(
                f"{key}={name} was requested, but torch {torch.__version__} (CUDA {torch.version.cuda}) "
                "sees no GPU: check the driver and CUDA_VISIBLE_DEVICES, or set device=cpu/auto."
            )
        index = torch.device(name).index or 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"{key}={name} was requested, but only {torch.cuda.device_count()} GPU(s) exist.")
        return torch.device(name)
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"{key}=mps was requested, but this torch sees no Apple GPU.")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"{key}: unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")

"""Choosing the torch device a site trains on: auto (CUDA when present), cpu or cuda."""

from feddem.common.errors import FeddemError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str):
    """The torch device for `name` (torch is imported here, not with the module: config checks need only DEVICES)."""
    import torch

    if name not in DEVICES:
        raise FeddemError(f"unknown device '{name}': choose one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FeddemError("device 'cuda' was asked for but torch sees no CUDA GPU (use --device cpu or auto)")
    return torch.device(name)

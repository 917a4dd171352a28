"""Multi-GPU training through ``torchrun`` (PyTorch DistributedDataParallel), and nothing when run alone.

``torchrun --nproc_per_node 4 -m training.pipeline ...`` starts one process per GPU with ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` set; every trainer calls :func:`wrap` on its network, which joins the process
group (NCCL on CUDA, gloo on CPU) and wraps the network in ``DistributedDataParallel`` so gradients are
averaged across processes. Each process draws its own batches (seed + rank); only rank 0 writes
checkpoints, logs and model folders (:func:`is_main`), and the others wait at :func:`barrier`.
With ``WORLD_SIZE`` unset or 1 every function is a no-op, so the single-process path stays plain.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This process's device: its own GPU under torchrun with CUDA, else the CPU."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def init() -> bool:
    """True if distributed: a process group exists already (e.g. a test's single-process gloo group) or
    torchrun started more than one process, in which case the group is joined here, once."""
    if dist.is_available() and dist.is_initialized():
        return True
    if world_size() > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return True
    return False


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def wrap(net: torch.nn.Module) -> torch.nn.Module:
    """``DistributedDataParallel(net)`` when distributed, else ``net`` unchanged."""
    if not init():
        return net
    dev = device()
    net = net.to(dev)
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    return net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()

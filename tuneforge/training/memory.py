"""`train.batch_size: auto`: the largest batch whose training step fits in memory.

Candidates double from 8. Each is tried with the longest examples of the training
set (the worst case for memory), forward and backward, in the mode training will
use. A candidate fits when it raises no out-of-memory error and the memory it
used stays under a share of the device's (GPU memory, or this machine's RAM on CPU:
there the allocator rarely raises, the system just starts swapping or kills us).
The probe leaves no trace: gradients are dropped, BatchNorm statistics and the RNG
are restored.
"""

from __future__ import annotations

import os
import resource
import sys

import torch

from tuneforge.training.loop import is_out_of_memory

MEMORY_SHARE = 0.8  # of the device's memory a training step may use
FIRST, LARGEST = 8, 1024


def _total_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return peak if sys.platform == "darwin" else peak * 1024


def _worst_case_batch(dataset, size: int) -> dict:
    """The `size` longest examples (text), or the first `size` (images: all the same size)."""
    order = list(range(len(dataset)))
    lengths = dataset.lengths()
    if lengths is not None:
        order.sort(key=lambda i: -lengths[i])
    picked = [order[i % len(order)] for i in range(size)]
    return dataset.collate([dataset[i] for i in picked])


def _step_fits(model, task, dataset, size: int, device: torch.device) -> bool:
    batch = _worst_case_batch(dataset, size)
    from accelerate.utils import send_to_device

    inputs, labels = send_to_device(batch["inputs"], device), send_to_device(batch["labels"], device)
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        task.compute_loss(model, inputs, labels).backward()
    except Exception as error:  # only out-of-memory means "does not fit"; anything else is a real bug
        if not is_out_of_memory(error):
            raise
        return False
    finally:
        model.zero_grad(set_to_none=True)
    return _peak_memory(device) < MEMORY_SHARE * _total_memory(device)


def find_batch_size(model, task, dataset, device: torch.device, train_mode) -> tuple[int, list[tuple[int, bool]]]:
    """Largest fitting power-of-two batch size (at least 1), and every size tried with its verdict."""
    buffers = {name: value.clone() for name, value in model.named_buffers()}
    tried: list[tuple[int, bool]] = []
    best = 1
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        train_mode()
        size = FIRST
        while size <= min(LARGEST, len(dataset)):
            fits = _step_fits(model, task, dataset, size, device)
            tried.append((size, fits))
            if not fits:
                break
            best, size = size, size * 2
        if not any(fits for _, fits in tried):  # even 8 is too much: try smaller
            size = FIRST // 2
            while size >= 1 and not _step_fits(model, task, dataset, size, device):
                tried.append((size, False))
                size //= 2
            best = max(size, 1)
            tried.append((best, True))
    with torch.no_grad():
        for name, value in model.named_buffers():
            value.copy_(buffers[name])
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return best, tried

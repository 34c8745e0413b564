"""Errors of torch.distributed collectives, shared by distributed training and tensor-parallel inference.

A peer that died or stopped answering shows up as a backend error in the collective that waited for it
(gloo raises a plain RuntimeError, NCCL a DistBackendError); collective_errors turns it into one
RankFailed whose message says so and keeps the backend's first line.
"""
import contextlib

import torch
import torch.distributed as dist


class RankFailed(RuntimeError):
    """Another rank failed or stopped answering; this rank stops too."""


@contextlib.contextmanager
def collective_errors(what):
    """Turn the backend's error when a peer died or timed out into one clear RankFailed that keeps the
    reason; out-of-memory passes unchanged."""
    try:
        yield
    except (RankFailed, getattr(torch, "OutOfMemoryError", RankFailed)):
        raise
    except (RuntimeError, dist.DistError) as exc:
        raise RankFailed(f"another rank failed or stopped answering while waiting for {what}: "
                         f"{first_line(exc)}") from exc


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

"""Model cost the pipeline measures besides FLOPs: median CPU latency (PyTorch and onnxruntime)
and bytes on disk."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimcore.flops import input_shape


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` intra-op threads, restoring the previous setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def measure_latencies(models: Mapping[str, nn.Module], input_size: int | tuple[int, ...], runs: int = 30,
                      warmup: int = 5, threads: int = 1) -> dict[str, dict[str, float]]:
    """CPU wall time per forward pass (ms) of several models, timed in interleaved rounds.

    Each round times every model once, so drift in machine load affects all models alike and
    their ratios (speedups) stay meaningful.  Returns median, p10 and p90 per model.
    """
    x = torch.randn(input_shape(input_size))
    nets = {label: m.eval().cpu() for label, m in models.items()}
    times: dict[str, list[float]] = {label: [] for label in nets}
    with torch_threads(threads):
        for net in nets.values():
            for _ in range(warmup):
                net(x)
        for _ in range(runs):
            for label, net in nets.items():
                start = time.perf_counter()
                net(x)
                times[label].append((time.perf_counter() - start) * 1e3)
    return {label: _spread(t, threads) for label, t in times.items()}


def _spread(times_ms: list[float], threads: int) -> dict[str, float]:
    t = sorted(times_ms)
    return {"median_ms": statistics.median(t), "p10_ms": t[len(t) // 10], "p90_ms": t[(len(t) * 9) // 10],
            "runs": len(t), "threads": threads}


def measure_ort_latencies(sessions: Mapping[str, Any], input_size: int | tuple[int, ...], runs: int = 30,
                          warmup: int = 5) -> dict[str, dict[str, float]]:
    """onnxruntime wall time per run (ms) of several sessions, timed in interleaved rounds.

    ``sessions``: onnxruntime ``InferenceSession`` objects (see :func:`slimcore.export.ort_session`,
    which sets their intra-op threads).  Same statistics as :func:`measure_latencies`.
    """
    x = torch.randn(input_shape(input_size)).numpy()
    feeds = {label: {s.get_inputs()[0].name: x} for label, s in sessions.items()}
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for label, session in sessions.items():
        for _ in range(warmup):
            session.run(None, feeds[label])
    for _ in range(runs):
        for label, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds[label])
            times[label].append((time.perf_counter() - start) * 1e3)
    threads = {label: int(s.get_session_options().intra_op_num_threads) for label, s in sessions.items()}
    return {label: _spread(t, threads[label]) for label, t in times.items()}


def measure_latency(model: nn.Module, input_size: int | tuple[int, ...], runs: int = 30,
                    warmup: int = 5, threads: int = 1) -> dict[str, float]:
    """Median and spread of CPU wall time per forward pass of one model, in milliseconds."""
    return measure_latencies({"model": model}, input_size, runs, warmup, threads)["model"]


def file_bytes(path: Path | str) -> int:
    """Size of a file on disk."""
    return Path(path).stat().st_size


__all__ = ["file_bytes", "measure_latencies", "measure_latency",
           "measure_ort_latencies", "torch_threads"]

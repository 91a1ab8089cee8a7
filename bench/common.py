"""Shared helpers of the benchmarks: machine description, timing, peak memory, output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def timeit(fn, device: str = "cpu", reps: int = 5, warmup: int = 1) -> dict:
    """Median and 20/80% quantiles in ms. On a GPU, triton.testing.do_bench."""
    if device == "cuda":
        from triton.testing import do_bench
        med, lo, hi = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"ms": med, "ms_p20": lo, "ms_p80": hi}
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return {"ms": statistics.median(times), "ms_p20": q[0], "ms_p80": q[3]}


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def peak_extra_rss(step) -> int:
    """Peak resident memory that one call of step() adds, in bytes (Linux).

    step() runs once first, so that libraries, thread pools and JIT kernels are loaded; the
    memory it freed is handed back to the OS (malloc_trim), the high-water mark is reset
    (/proc/self/clear_refs), and the second call is measured against the resident size
    before it."""
    import ctypes
    import gc
    step()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = current_rss()
    step()
    return max(0, _peak_rss() - base)


def measure_peak_in_subprocess(script: Path, args: list[str]) -> int:
    """Runs `script --peak-memory <args>` in a fresh process, which prints the peak extra
    bytes of the measured call (peak_extra_rss) on its last line."""
    out = subprocess.run([sys.executable, str(script), "--peak-memory", *args], check=True,
                         capture_output=True, text=True, cwd=ROOT)
    return int(out.stdout.strip().splitlines()[-1])


def write_json(path: Path, payload: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Plain-text table of `rows` with (key, header) columns."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)
    cells = [[h for _, h in columns]] + [[fmt(r.get(k, "")) for k, _ in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c[i].rjust(widths[i]) for i in range(len(columns))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

"""What every benchmark script shares: the machine description and writing its own
section of RESULTS.md without touching the others."""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    """CPU model, cores, RAM and library versions, for the results table."""
    cpu = platform.processor() or "unknown CPU"
    ram = "RAM unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 2**20:.0f} GiB RAM"
    except OSError:
        pass
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "absent"
    return (
        f"{cpu}, {os.cpu_count()} cores, {ram}; Python {platform.python_version()}, "
        f"numpy {np.__version__}, torch {torch_version}"
    )


def load_note() -> str:
    """The 1-minute load average, because other work on 2 cores slows every figure."""
    try:
        return f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)"
    except OSError:
        return "load average unknown"


def report(
    title: str,
    command: str,
    block: Sequence[str],
    detail: str = "",
    before: Sequence[str] = (),
    after: Sequence[str] = (),
) -> str:
    """A RESULTS.md section: title, machine, command, paragraphs `before`, the measured lines
    in a code block, paragraphs `after`."""
    lines = [
        f"## {title}",
        "",
        f"Machine: {machine()}",
        f"Command: `{command}`" + (f" {detail}" if detail else ""),
        "",
    ]
    for paragraph in before:
        lines += [paragraph, ""]
    lines += ["```", *block, "```"]
    for paragraph in after:
        lines += ["", paragraph]
    return "\n".join(lines)


def write_section(section: str, text: str) -> None:
    """Replace `section` of RESULTS.md (or append it), keeping the others."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(old):
        new = pattern.sub(lambda _: block, old)
    else:
        new = old.rstrip() + "\n\n" + block
    tmp = RESULTS.with_suffix(".md.tmp")
    tmp.write_text(new)
    tmp.replace(RESULTS)


def interval(block: dict) -> str:
    """`mean [lo, hi]` of a {mean, lo, hi} result, three decimals."""
    return f"{block['mean']:.3f} [{block['lo']:.3f}, {block['hi']:.3f}]"

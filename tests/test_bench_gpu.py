"""``bench/gpu.py --smoke``: every part runs at tiny sizes on the CPU and fills the table."""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))

import gpu
from gpu_parts import PARTS


def test_smoke_runs_every_part(capsys):
    gpu.main(["--smoke"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert "FAILED" not in out
    implementations = [row.split(" | ")[2] for row in rows[1:]]
    assert implementations == [
        *(["bf16 matmul", "NF4, XLA dequantize + matmul", "NF4, jpeft matmul (XLA)"] * 2),
        "jpeft bf16",
        "jpeft LoRA r=16 (merged per call)",
        "jpeft NF4",
        "transformers generate (static cache)",
        "jpeft LoRA",
        "jpeft QLoRA",
        "transformers + peft",
        "transformers + peft + bitsandbytes",
        "jpeft LoRA, paged AdamW",
    ]
    assert len(PARTS) == 8
    targets = [line for line in out.splitlines() if line.startswith("- ")]
    assert len(targets) == 6  # the M=4096 matmul target has no row at smoke sizes
    assert out.startswith("`python bench/gpu.py --smoke`")

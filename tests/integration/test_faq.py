"""Claims of docs/faq.md that no other test covers: DDP's "Expected to mark a variable ready only
once" comes from reentrant checkpointing, and a remat plan on the same model does not raise it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import copy, sys
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint
import remat
from remat.models import build_builtin

dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
torch.manual_seed(0)
built = build_builtin("gpt", n_layer=3, d_model=32, n_head=4, seq=16, batch=2, vocab=32)
reference = copy.deepcopy(built.model)


class Reentrant(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=True)


wrapped = copy.deepcopy(reference)
for i, block in enumerate(wrapped.blocks):
    wrapped.blocks[i] = Reentrant(block)
ddp = torch.nn.parallel.DistributedDataParallel(wrapped, find_unused_parameters=True)
try:
    built.loss_fn(ddp(*built.example_inputs)).backward()
    print("reentrant: ok")
except RuntimeError as error:
    print("reentrant:", str(error).splitlines()[0])

remat.apply_(built.model, remat.baseline_plan("full", remat.find_units(built.model)))
ddp = torch.nn.parallel.DistributedDataParallel(built.model, find_unused_parameters=True)
torch.manual_seed(1)
built.loss_fn(ddp(*built.example_inputs)).backward()
torch.manual_seed(1)
built.loss_fn(reference(*built.example_inputs)).backward()
equal = all(
    torch.equal(a.grad, b.grad) for a, b in zip(built.model.parameters(), reference.parameters())
)
print("remat: gradients", "equal" if equal else "DIFFER")
dist.destroy_process_group()
"""


def test_ddp_mark_ready_twice_is_reentrant_checkpointing_not_remat(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "reentrant: Expected to mark a variable ready only once" in done.stdout
    assert "remat: gradients equal" in done.stdout

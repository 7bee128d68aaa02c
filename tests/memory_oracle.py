"""An independent memory oracle for the tests: the peak of live tensor storage over one training step.

It shares no code with ``remat.profiling.tracker`` (nor imports anything from ``remat``), so a test
that asks "does the applied plan fit its budget?" can ask something other than the code that chose
the plan. It runs its own training step (:func:`oracle_step_peak`: zero grads, forward, loss,
backward, optimizer step, with its own optimizer) and counts, under a small ``TorchDispatchMode``:

- every storage alive at entry that the step can reach: parameters, buffers, gradients, the
  optimizer's state and the batch (:class:`StorageOracle` ``roots``);
- every storage an op reads or writes that it has not seen (a tensor captured by a closure);
- every new storage an op returns, until it dies (a ``weakref.finalize`` on the storage object).

Storages are keyed by a token held in a ``WeakKeyDictionary`` on the storage object (which
torch keeps the same for one storage while it lives), and their size is re-read after every op
that touches them (``resize_`` moves a storage to a new address and size). Storages of 0 bytes
are not counted until they grow.

Definitions, against remat's tracker (``remat.measure_plan``):

- Same: the batch and everything alive at entry are counted, as the tracker's static base is.
- Same: AdamW's ``step`` counters (0-dim, 4 bytes each, on the CPU) are counted: they are live CPU
  storage reachable from the optimizer.
- Different: on ``meta`` the oracle counts what torch's meta kernels return, which is not
  always what the CPU's return (attention); the tracker mirrors the CPU's kernels there. The
  oracle measures real devices only.
- Different: remat's tracker counts an offloaded activation's host copy apart (``host_bytes``),
  the oracle does not know which copies are "host": on the CPU they are the same memory and it
  counts them. Tests of offload plans on the CPU compare with that in mind.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["StorageOracle", "make_optimizer", "oracle_step_peak", "step_peak"]


def _tensors(tree: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(tree)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


class StorageOracle(TorchDispatchMode):
    """Live bytes of tensor storage, and their peak, while entered.

    ``roots``: anything holding tensors alive at entry (modules, optimizers, tensors, nested
    tuples/lists/dicts of them); counted from the start. ``round_bytes``: each storage counted
    rounded up to a multiple of it (512 to compare with CUDA's caching allocator).

    Example (one matmul on an 8x8 weight and a 4x8 input: 256 + 128 bytes at entry, 128 made)::

        >>> w, x = torch.ones(8, 8), torch.ones(4, 8)
        >>> with StorageOracle([w, x]) as oracle:
        ...     y = x @ w
        >>> oracle.entry_bytes, oracle.peak_bytes
        (384, 512)
    """

    def __init__(self, roots: Iterable[Any] = (), *, round_bytes: int = 1) -> None:
        super().__init__()
        self.round_bytes = round_bytes  # 512: CUDA's caching allocator's block
        self.live: dict[int, int] = {}  # token -> bytes, one token per live storage
        self._tokens: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._count = itertools.count()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.entry_bytes = 0
        self._roots = list(roots)
        self._finalizers: list[weakref.finalize] = []

    def __enter__(self) -> StorageOracle:
        for root in self._roots:
            for tensor in _root_tensors(root):
                self._see(tensor)
        self.entry_bytes = self.live_bytes
        return super().__enter__()

    def __exit__(self, *exc_info: Any) -> None:
        super().__exit__(*exc_info)
        for finalizer in self._finalizers:
            finalizer.detach()
        self._finalizers.clear()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        inputs = _tensors((args, kwargs))
        for tensor in inputs:  # alive before the op: an input read for the first time
            self._see(tensor)
        out = func(*args, **kwargs)
        for tensor in inputs + _tensors(out):
            self._see(tensor)
        return out

    def _see(self, tensor: torch.Tensor) -> None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse, nested: nothing in these tests
            return
        nbytes = -(-storage.nbytes() // self.round_bytes) * self.round_bytes
        token = self._tokens.get(storage)
        if token is not None:
            self._add(nbytes - self.live[token])  # resized in place (resize_, out=)
            self.live[token] = nbytes
            return
        if nbytes == 0:
            return
        token = next(self._count)
        self._tokens[storage] = token
        self.live[token] = nbytes
        self._add(nbytes)
        self._finalizers.append(weakref.finalize(storage, self._free, token))

    def _free(self, token: int) -> None:
        self.live_bytes -= self.live.pop(token, 0)

    def _add(self, nbytes: int) -> None:
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)


def _root_tensors(root: Any) -> list[torch.Tensor]:
    if isinstance(root, torch.nn.Module):
        found = [*root.parameters(), *root.buffers()]
        return found + [p.grad for p in root.parameters() if p.grad is not None]
    if isinstance(root, torch.optim.Optimizer):
        return [v for state in root.state.values() for v in state.values() if torch.is_tensor(v)]
    return _tensors(root)


def make_optimizer(spec: Any, model: torch.nn.Module) -> torch.optim.Optimizer | None:
    """The optimizer a measured step runs, its state made as in any step of training after the
    first: ``"adamw"``, ``"sgd"``, ``"none"``/``None``, an optimizer instance (a new one of its
    class with its groups' hyperparameters) or a factory ``params -> optimizer``. State is made
    by one real step on zero gradients; the weights are put back afterwards."""
    params = [p for p in model.parameters() if p.requires_grad]
    if spec is None or spec == "none":
        return None
    if spec == "sgd":
        return torch.optim.SGD(params, lr=1e-3)
    if spec == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=1e-3)
    elif isinstance(spec, torch.optim.Optimizer):
        groups = [{**g, "params": list(g["params"])} for g in spec.param_groups]
        opt = type(spec)(groups)
    elif callable(spec):
        opt = spec(params)
    else:
        raise ValueError(f"optimizer: got {spec!r}; expected adamw, sgd, none, one or a factory")
    saved = [p.detach().clone() for p in params]
    for param in params:
        param.grad = torch.zeros_like(param)
    opt.step()
    with torch.no_grad():
        for param, value in zip(params, saved, strict=True):
            param.copy_(value)
            param.grad = None
    return opt


def _default_loss(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor) and output.dim() == 0:
        return output
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.dim() == 0:
        return loss
    floats = [t for t in _tensors(output) if t.is_floating_point() and t.requires_grad]
    return sum((t.float().mean() for t in floats[1:]), floats[0].float().mean())


AUTOCAST = {"32": None, "bf16-true": None, "bf16-mixed": torch.bfloat16}


def oracle_step_peak(
    model: torch.nn.Module,
    batch: Any,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    optimizer: Any = "adamw",
    precision: str = "32",
    grads_alive: bool = False,
) -> int:
    """Peak live bytes of one training step of ``model`` (with whatever plan is applied to it)
    on ``batch``, counted by :class:`StorageOracle`. ``precision``: ``"32"``, ``"bf16-true"``
    (as the model is) or ``"bf16-mixed"`` (forward and loss under CPU/CUDA autocast).
    ``grads_alive``: the gradients exist (zero) from the start, as in the last micro-batch of
    gradient accumulation. The model's parameters, buffers and gradients are put back afterwards.

    Example (a Linear 8->8 without bias, SGD, a batch of 4: weight 256 + input 128 at entry;
    the forward makes the output, 128, and the loss, 4; backward the loss's gradient, 4, the
    output's, 128, and the weight's, 256, while the output is held: 904)::

        >>> oracle_step_peak(torch.nn.Linear(8, 8, bias=False), (torch.ones(4, 8),),
        ...                  optimizer="sgd")
        904
    """
    if precision not in AUTOCAST:
        raise ValueError(f"precision: got {precision!r}; expected one of {list(AUTOCAST)}")
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    grads = [p.grad for p in model.parameters()]
    opt = make_optimizer(optimizer, model)
    for param in model.parameters():
        param.grad = torch.zeros_like(param) if grads_alive and param.requires_grad else None
    if isinstance(batch, torch.Tensor):
        args, kwargs = (batch,), {}
    else:
        args, kwargs = (batch, {}) if isinstance(batch, tuple | list) else ((), batch)
    roots = [model, batch] + ([opt] if opt is not None else [])
    device = next(model.parameters()).device.type
    dtype = AUTOCAST[precision]
    try:
        with StorageOracle(roots) as oracle:
            # as a training loop writes it: the output held in a variable through backward
            autocast = torch.autocast(device, dtype=dtype) if dtype else contextlib.nullcontext()
            with autocast:
                output = model(*args, **kwargs)
                loss = (loss_fn or _default_loss)(output)
            loss.backward()
            if opt is not None:
                opt.step()
            del output, loss
    finally:
        with torch.no_grad():
            model.load_state_dict(state)
        for param, grad in zip(model.parameters(), grads, strict=True):
            param.grad = grad
    return oracle.peak_bytes


def step_peak(step: Any, plan: Any = None) -> int:
    """:func:`oracle_step_peak` of a ``remat.Step`` (its model, batch, loss, optimizer,
    precision and accumulation), with ``plan`` applied for the step (``None``: as the model is,
    a plan already applied included)."""
    fields = {
        "loss_fn": step.loss_fn,
        "optimizer": step.optimizer,
        "precision": step.precision,
        "grads_alive": step.accumulation_steps > 1,
    }
    if plan is None:
        return oracle_step_peak(step.model, step.batch, **fields)
    import remat  # only to apply the plan under test; nothing of remat counts the bytes

    with remat.apply_(step.model, plan):
        return oracle_step_peak(step.model, step.batch, **fields)

"""Lightning: :class:`RematCallback` plans remat for the step a ``lightning.pytorch.Trainer`` runs.

    trainer = pl.Trainer(precision="bf16-mixed", accumulate_grad_batches=4,
                         callbacks=[RematCallback(budget="60%")])
    trainer.fit(module, loader)

**When.** Lightning runs ``setup`` before the strategy moves the model and before
``configure_optimizers``; the first batch exists only inside the training loop. The callback plans
in ``on_train_batch_start`` of the first batch: the batch is on the device, the optimizer exists,
and under the single-device and DDP strategies the LightningModule's own submodules are the ones
trained (DDP wraps the module without changing them), so a plan installed on them is the one
that runs. It is planned once per ``fit`` and taken off at the ``fit``'s teardown.

**What is planned.** The step is the LightningModule's own ``training_step(batch, 0)``: remat
profiles a view of the module whose forward is that ``training_step`` (its loss, or its dict's
``"loss"``), with the module's submodules, parameters and FQNs, so the plan names the module's
units (``model.blocks.0``, ...) and its fingerprint the module's class. Whatever the
``training_step`` does, the plan measures: the inner model's forward, the loss, and anything else
it computes. While remat profiles, ``self.log`` and ``self.log_dict`` do nothing, and the random
number generators are put back afterwards: the training run draws the numbers it draws without
the callback.

**The step's settings** come from the Trainer: ``trainer.precision`` (``"32-true"``,
``"bf16-mixed"``, ``"16-mixed"``, ``"bf16-true"`` -> remat's ``"32"``, ``"bf16-mixed"``,
``"fp16-mixed"``, ``"bf16-true"``), ``trainer.optimizers[0]`` (profiled on a new optimizer of its
class and hyperparameters; the Trainer's is not touched), ``trainer.accumulate_grad_batches`` and
``trainer.world_size`` (under DDP one rank's step is planned on rank 0 and sent to every rank).
Lightning calls ``training_step`` before ``zero_grad``: the previous step's gradients are alive
through the forward, as in a micro-batch of gradient accumulation. So the step planned is the last
micro-batch of an accumulation (at least 2), whose gradients are alive from the start: its peak is
Lightning's to within the gradients the backward adds into (Lightning frees them first), so the
prediction is a little above the measured peak (in every case measured: for the tiny GPT of the
tests, 7% at ``"min"``, 2% unplanned). Planned as a plain step, the forward's peak with those
gradients alive was 9% above the prediction.

**Saved, logged, reused.** The plan is saved as ``remat_plan.json`` in ``trainer.default_root_dir``
(or ``output_dir=``) and reused, without profiling, by a later ``fit`` (a resume) of the same
module class, parameter shapes and settings. Its summary (units checkpointed, predicted peak,
budget, overhead) goes through ``pl_module.log_dict`` to the Trainer's loggers and
``trainer.callback_metrics``, and through ``logging.getLogger("remat")``.

**Limits.** Refused, with the fix named: manual optimization (``automatic_optimization = False``:
the step is not ``training_step`` then a step of one optimizer), several optimizers, FSDP,
DeepSpeed and model-parallel strategies (their modules are sharded by the time a batch exists:
use the strategy's own activation checkpointing, or plan the bare model with
:func:`remat.integrations.trainer_plan.plan_for_trainer` before wrapping it yourself), precisions
remat does not plan (``"16-true"``, ``"64-true"``, ``transformer-engine``), and a module that
checkpoints itself (Hugging Face ``gradient_checkpointing``). ``training_step`` runs several
times while remat profiles (its side effects other than logging happen then too). Lightning's
autocast runs with ``cache_enabled=False``; remat plans mixed precision with the cast cache, so
the measured peak may sit a little below the predicted one. Gradient clipping and learning-rate
schedulers are not part of the measured step (neither holds activations).

Needs the ``lightning`` extra (``pip install 'remat[lightning]'``); lightning is imported when
:class:`RematCallback` is first used. The callback subclasses ``lightning.pytorch.Callback``
(``pytorch_lightning.Callback`` where only that package is installed); the Trainer of either
package calls its hooks (a fit and a resume with ``pytorch_lightning`` 2.6 were checked by hand).

Example:
    >>> from remat.integrations.lightning import RematCallback, trainer_precision
    >>> callback = RematCallback(budget="min")
    >>> callback.budget, trainer_precision("16-mixed")
    ('min', 'fp16-mixed')
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["PRECISIONS", "RematCallback", "trainer_precision"]  # noqa: F822 (made on first use)

PRECISIONS = {
    "32-true": "32",
    "32": "32",
    "bf16-mixed": "bf16-mixed",
    "16-mixed": "fp16-mixed",
    "bf16-true": "bf16-true",
}
"""Lightning's ``trainer.precision`` -> remat's ``precision``."""

_SHARDING_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def trainer_precision(precision: Any) -> str:
    """remat's precision for Lightning's ``trainer.precision``.

    Example:
        >>> trainer_precision("bf16-mixed"), trainer_precision("32-true")
        ('bf16-mixed', '32')
        >>> trainer_precision("16-true")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: RematCallback: trainer precision: got '16-true'; expected one of ...
    """
    name = str(precision)
    if name not in PRECISIONS:
        raise ValueError(
            f"RematCallback: trainer precision: got {name!r}; expected one of"
            f" {list(PRECISIONS)} (the steps remat plans). Fix: train with one of them, or"
            " drop the callback"
        )
    return PRECISIONS[name]


def _lightning() -> Any:
    """``lightning.pytorch``, else ``pytorch_lightning``, else an ImportError naming the extra."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError:
            raise ImportError(
                "remat.integrations.lightning needs Lightning: pip install 'remat[lightning]'"
                " (or pip install lightning)"
            ) from None
    return pl


class _TrainingStepView(nn.Module):
    """A LightningModule seen as a model whose forward is its ``training_step``'s loss: the same
    submodules, parameters and buffers (the same dicts), so FQNs, fingerprints and plans are the
    module's own; made by :func:`_step_view`."""

    _step_of: Any

    def forward(self, batch: Any) -> torch.Tensor:
        out = self._step_of.training_step(batch, 0)
        if isinstance(out, Mapping):
            out = out.get("loss")
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            raise ValueError(
                "RematCallback: training_step returned"
                f" {type(out).__name__}; expected the loss (a scalar tensor, or a dict with"
                " 'loss'), as automatic optimization needs. Fix: return the loss"
            )
        return out


_VIEW_CLASSES: dict[type, type] = {}


def _step_view(pl_module: nn.Module) -> nn.Module:
    """The :class:`_TrainingStepView` of ``pl_module``, of a class named as the module's."""
    cls = _VIEW_CLASSES.get(type(pl_module))
    if cls is None:
        cls = type(type(pl_module).__name__, (_TrainingStepView,), {"__module__": __name__})
        _VIEW_CLASSES[type(pl_module)] = cls
    view = cls()
    for name in ("_modules", "_parameters", "_buffers"):
        object.__setattr__(view, name, getattr(pl_module, name))
    object.__setattr__(view, "_step_of", pl_module)  # not a child: a view, not a wrapper
    view.training = pl_module.training
    return view


@contextlib.contextmanager
def _quiet(pl_module: Any) -> Iterator[None]:
    """``self.log`` and ``self.log_dict`` do nothing while remat runs ``training_step``."""
    pl_module.log = pl_module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict


def _check_trainer(trainer: Any, pl_module: Any) -> None:
    """Refuse what the callback cannot plan, naming the fix."""
    strategy = type(trainer.strategy).__name__
    if any(c.__name__ in _SHARDING_STRATEGIES for c in type(trainer.strategy).__mro__):
        raise ValueError(
            f"RematCallback: got the {strategy}; expected a single-device or DDP strategy: under"
            " sharding strategies the module's layers are wrapped and sharded before the first"
            " batch. Fix: use the strategy's own activation checkpointing, or plan the bare model"
            " with remat.integrations.trainer_plan.plan_for_trainer(..., fsdp=True) before"
            " sharding it yourself"
        )
    if not pl_module.automatic_optimization:
        raise ValueError(
            "RematCallback: got automatic_optimization = False; expected automatic optimization"
            " (a training_step returning the loss, stepped by one optimizer). Fix: plan the"
            " inner model with remat.auto_(model, batch, budget=..., loss_fn=...) in setup()"
        )
    if len(trainer.optimizers) > 1:
        raise ValueError(
            f"RematCallback: got {len(trainer.optimizers)} optimizers; expected one. Fix: plan"
            " with remat.auto_ yourself, naming the optimizer whose state counts"
        )


def _make_callback_class(pl: Any) -> type:
    class RematCallback(pl.Callback):
        """Plan remat for the Trainer's step at its first batch; see the module's docstring.

        Args:
            budget: as :func:`remat.auto_` (bytes, ``"22GiB"``, ``"60%"``, ``"min"``).
            output_dir: where ``remat_plan.json`` is saved and read back on resume (default:
                ``trainer.default_root_dir``; ``False``: neither).
            options: more :func:`remat.auto_` options (``units``, ``actions``,
                ``capacity_bytes``).

        After planning, ``handle`` is the installed plan's :class:`~remat.Handle` (``None``
        after the fit), ``plan`` the :class:`~remat.Plan` and ``summary`` what was logged.

        Example:
            >>> from remat.integrations.lightning import RematCallback
            >>> RematCallback(budget="60%", actions=["keep", "recompute"]).options
            {'actions': ['keep', 'recompute']}
        """

        def __init__(self, budget: int | str, *, output_dir: Any = None, **options: Any) -> None:
            super().__init__()
            self.budget = budget
            self.output_dir = output_dir
            self.options = options
            self.handle: Any = None
            self.plan: Any = None
            self.summary: dict[str, Any] = {}

        def on_train_batch_start(
            self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
        ) -> None:
            if self.handle is not None:
                return
            self.handle = self._plan(trainer, pl_module, batch)
            self.plan = self.handle.plan
            numbers = {
                key: float(value)
                for key, value in self.summary.items()
                if isinstance(value, (int, float)) and value is not None
            }
            pl_module.log_dict(numbers, on_step=True, on_epoch=False, batch_size=1)

        def _plan(self, trainer: Any, pl_module: Any, batch: Any) -> Any:
            from remat.integrations.trainer_plan import plan_for_trainer

            _check_trainer(trainer, pl_module)
            output_dir = self.output_dir
            if output_dir is None:
                output_dir = trainer.default_root_dir
            optimizer = trainer.optimizers[0] if trainer.optimizers else "none"
            with _quiet(pl_module):
                return plan_for_trainer(
                    _step_view(pl_module),
                    (batch,),
                    budget=self.budget,
                    output_dir=output_dir or None,
                    precision=trainer_precision(trainer.precision),
                    optimizer=optimizer,
                    accumulation_steps=max(trainer.accumulate_grad_batches, 2),
                    world_size=trainer.world_size,
                    fsdp=False,
                    log=self.summary.update,
                    **self.options,
                )

        def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
            if self.handle is not None:
                self.handle.remove()
                self.handle = None

    RematCallback.__module__ = __name__
    RematCallback.__qualname__ = "RematCallback"
    return RematCallback


def __getattr__(name: str) -> Any:
    """``RematCallback`` is made (and lightning imported) on first use."""
    if name == "RematCallback":
        cls = _make_callback_class(_lightning())
        globals()["RematCallback"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Hugging Face transformers: MODEL specs ``hf:<name>``, and readying any transformers model for a plan.

Consumes a model name (``gpt2``, ``llama``, ``bert``, ``t5``) and config overrides; produces a
:class:`~remat.models.BuiltModel` built from the config class with random weights (nothing is
downloaded, the network is never used), with synthetic token ids and labels so that the model returns
its own loss (``ModelOutput.loss``, which :func:`remat.profiling.step.default_loss` picks up). T5 gets
``labels`` only: the model makes its decoder inputs by shifting them right.

:func:`prepare_model` readies any transformers model for training under a plan: the KV cache is
turned off (with a warning), and a model that checkpoints itself (``gradient_checkpointing_enable()``)
is refused or, if asked, switched back. The units need nothing special: :func:`remat.find_units`
finds the layers (``model.layers.N``, ``transformer.h.N``, ``bert.encoder.layer.N``,
``encoder.block.N`` and ``decoder.block.N``). Any transformers model trains under remat without
its KV cache anyway (:func:`remat.apply.apply.kv_cache_off`, while measuring and while a plan is on).

:func:`prepare_meta` readies transformers models for ``meta`` (``hf:`` models built there, factories
on ``--device meta``, estimate mode): the mask checks transformers makes on tensor values are
answered as for a batch without padding.

``RematCallback(budget=...)`` is a ``transformers.TrainerCallback``: passed to a ``Trainer``, it
plans for the Trainer's own step at the start of training, applies the plan, saves it in
``output_dir`` and reuses it on resume (see ``docs/trainers.md``).

Needs the ``hf`` extra (``pip install 'remat[hf]'``); transformers is imported on first use.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import nn

from remat.integrations.hf_meta import prepare_meta
from remat.models.base import BuiltModel, _check_int, _value_error

__all__ = [
    "HF_MODELS",
    "RematCallback",  # noqa: F822 (made on first use, by __getattr__)
    "build",
    "checkpointing_modules",
    "config_keys",
    "first_batch",
    "prepare_meta",
    "prepare_model",
    "refuse_trainer_args",
    "trainer_precision",
]


@dataclass(frozen=True)
class _Family:
    config_class: str
    model_class: str
    task: str
    """``causal`` (labels are the inputs), ``masked`` (labels at every position), ``seq2seq``."""
    defaults: dict[str, Any] = field(default_factory=dict)
    positions_key: str | None = None
    """The config key that bounds the sequence length, if any."""


# Tiny but sensible: four layers, width 128, a 1024-token vocabulary, 4 x 128 tokens; a CPU step
# takes milliseconds, and the layers, not the optimizer step, make the peak.
HF_MODELS: dict[str, _Family] = {
    "gpt2": _Family(
        "GPT2Config",
        "GPT2LMHeadModel",
        "causal",
        {"n_layer": 4, "n_embd": 128, "n_head": 4, "n_positions": 512, "vocab_size": 1024},
        positions_key="n_positions",
    ),
    "llama": _Family(
        "LlamaConfig",
        "LlamaForCausalLM",
        "causal",
        {
            "num_hidden_layers": 4,
            "hidden_size": 128,
            "intermediate_size": 344,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 512,
            "vocab_size": 1024,
        },
        positions_key="max_position_embeddings",
    ),
    "bert": _Family(
        "BertConfig",
        "BertForMaskedLM",
        "masked",
        {
            "num_hidden_layers": 4,
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_attention_heads": 4,
            "max_position_embeddings": 512,
            "vocab_size": 1024,
        },
        positions_key="max_position_embeddings",
    ),
    "t5": _Family(
        "T5Config",
        "T5ForConditionalGeneration",
        "seq2seq",
        {
            "num_layers": 4,
            "d_model": 128,
            "d_ff": 512,
            "num_heads": 4,
            "d_kv": 32,
            "vocab_size": 1024,
            # T5 starts decoding from its pad token; the config class leaves it to the checkpoint's
            # generation config, and shifting labels right needs it.
            "decoder_start_token_id": 0,
        },
    ),
}
"""The models ``hf:<name>`` builds: config class, model class, and the default (tiny) sizes."""

_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
_NOT_SETTABLE = {"model_type", "transformers_version", "architectures"}


def _transformers() -> ModuleType:
    """The transformers module, or a ValueError that names the ``hf`` extra."""
    try:
        import transformers
    except ImportError:
        raise _value_error(
            "hf models",
            "no transformers",
            "the transformers package (remat's `hf` extra)",
            "pip install 'remat[hf]' (or pip install transformers)",
        ) from None
    return transformers


def _family(name: str) -> _Family:
    family = HF_MODELS.get(name)
    if family is None:
        close = difflib.get_close_matches(str(name), list(HF_MODELS), n=1)
        hint = f"did you mean hf:{close[0]}? " if close else ""
        raise _value_error(
            "hf model",
            f"hf:{name}",
            f"one of: {', '.join('hf:' + n for n in HF_MODELS)}",
            f"{hint}use one of the listed names, or a factory of your own (package.module:factory)",
        )
    return family


def config_keys(name: str) -> list[str]:
    """The config keys ``hf:<name>`` accepts as overrides (with the config's aliases, such as
    ``hidden_size`` for GPT-2's ``n_embd``), besides ``batch`` and ``seq``.

    Example:
        >>> keys = config_keys("gpt2")
        >>> "n_layer" in keys, "hidden_size" in keys, "model_type" in keys
        (True, True, False)
    """
    config_class = getattr(_transformers(), _family(name).config_class)
    base = config_class()
    keys = {k for k in base.to_dict() if not k.startswith("_")} | set(config_class.attribute_map)
    keys |= {"attn_implementation"}
    return sorted(keys - _NOT_SETTABLE)


def _config_kwargs(
    name: str, family: _Family, config_class: Any, overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """The config's keyword arguments: defaults, then overrides (aliases resolved), no KV cache,
    and special tokens inside the vocabulary."""
    accepted = config_keys(name)
    aliases = dict(config_class.attribute_map)
    kwargs = dict(family.defaults)
    for key, value in overrides.items():
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise _value_error(
                f"hf:{name}: unknown config key",
                key,
                f"batch, seq or a key of {family.config_class}: {', '.join(accepted)}",
                f"{hint}drop it or use one of the accepted keys",
            )
        kwargs[aliases.get(key, key)] = value  # an alias and its target name one setting
    kwargs.setdefault("use_cache", False)  # built for training: no KV cache
    base = config_class()
    vocab = kwargs.get("vocab_size", getattr(base, "vocab_size", None))
    if isinstance(vocab, int):
        for key in _TOKEN_KEYS:  # GPT-2's 50256 is not a token of a small vocabulary
            default = getattr(base, key, None)
            if key not in kwargs and isinstance(default, int) and default >= vocab:
                kwargs[key] = vocab - 1
    return kwargs


def build(name: str, *, batch: int = 4, seq: int = 128, **overrides: Any) -> BuiltModel:
    """Build ``hf:<name>`` with random weights on the default device, with synthetic inputs.

    Args:
        name: ``gpt2``, ``llama``, ``bert`` or ``t5`` (see :data:`HF_MODELS`).
        batch, seq: the batch of token ids (T5's labels have the same length).
        overrides: config keys (:func:`config_keys`), e.g. ``num_hidden_layers=12``.

    Returns:
        A :class:`~remat.models.BuiltModel` whose inputs are keyword arguments (``input_ids``,
        ``attention_mask``, ``labels``), whose model returns its loss, in training mode and
        prepared by :func:`prepare_model` (and on ``meta``, by :func:`prepare_meta`).

    Raises:
        ValueError: an unknown name or config key, a sequence longer than the model's positions,
            values the config class refuses (got / expected / fix); no transformers installed.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> built = build("llama", batch=2, seq=16, num_hidden_layers=2, hidden_size=64)
        >>> out = built.model(**built.example_inputs)
        >>> out.loss.shape, built.model.config.use_cache
        (torch.Size([]), False)
    """
    family = _family(name)
    batch, seq = _check_int("batch", batch), _check_int("seq", seq)
    transformers = _transformers()
    config_class = getattr(transformers, family.config_class)
    kwargs = _config_kwargs(name, family, config_class, overrides)
    try:
        config = config_class(**kwargs)
        model = getattr(transformers, family.model_class)(config)
    except (TypeError, ValueError, RuntimeError, AssertionError) as error:
        given = {k: v for k, v in kwargs.items() if k in overrides or k in family.defaults}
        raise _value_error(
            f"hf:{name}: {family.config_class} refused the configuration ({error})",
            given,
            "sizes the model accepts (e.g. hidden size divisible by the number of heads)",
            "change the --set values",
        ) from None
    if family.positions_key is not None:
        limit = getattr(config, family.positions_key)
        if seq > limit:
            raise _value_error(
                f"hf:{name}: seq",
                seq,
                f"at most {family.positions_key}={limit}",
                f"use seq={limit} or less, or --set {family.positions_key}={seq}",
            )
    prepare_model(model)
    if torch.get_default_device().type == "meta":
        prepare_meta(model)
    vocab = config.vocab_size
    input_ids = torch.randint(0, vocab, (batch, seq))
    labels = input_ids if family.task == "causal" else torch.randint(0, vocab, (batch, seq))
    return BuiltModel(
        model=model,
        example_inputs={
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": labels,
        },
        loss_fn=None,  # the model returns its loss; default_loss takes ModelOutput.loss
        name=f"hf:{name}",
    )


def checkpointing_modules(model: nn.Module) -> list[str]:
    """FQNs of the modules that checkpoint themselves (``gradient_checkpointing`` is True, as
    ``gradient_checkpointing_enable()`` / ``activation_checkpointing_enable()`` set); ``""`` is the
    model itself.

    Example:
        >>> built = build("gpt2", seq=8, n_layer=2, n_embd=32, n_head=2)
        >>> checkpointing_modules(built.model)
        []
        >>> import warnings
        >>> with warnings.catch_warnings():  # transformers 5 renamed it activation_checkpointing_
        ...     warnings.simplefilter("ignore", FutureWarning)
        ...     built.model.gradient_checkpointing_enable()
        >>> checkpointing_modules(built.model)
        ['transformer', 'transformer.h.0', 'transformer.h.1']
    """
    return [
        name
        for name, module in model.named_modules()
        if getattr(module, "gradient_checkpointing", False) is True
    ]


def prepare_model(model: nn.Module, *, disable_gradient_checkpointing: bool = False) -> nn.Module:
    """Ready a transformers model for training with a remat plan, in place; returns it.

    * ``use_cache`` is turned off, with a warning, on every config in the model that has it on: in
      training the KV cache would keep every layer's keys and values alive, and a recomputed layer
      appends to it a second time, so memory goes up instead of down.
    * A model that checkpoints itself (``gradient_checkpointing_enable()``) would recompute twice
      under a plan, and :func:`remat.apply_` refuses it: this raises the same ``ValueError`` here,
      or with ``disable_gradient_checkpointing=True`` turns Hugging Face's checkpointing off.

    Example:
        >>> import warnings
        >>> built = build("gpt2", seq=8, n_layer=2, n_embd=32, n_head=2)
        >>> built.model.config.use_cache = True
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = prepare_model(built.model)
        >>> built.model.config.use_cache, "use_cache" in str(caught[0].message)
        (False, True)
    """
    cached = [
        name
        for name, module in model.named_modules()
        if getattr(getattr(module, "config", None), "use_cache", False) is True
    ]
    for name in cached:
        model.get_submodule(name).config.use_cache = False
    if cached:
        where = ", ".join(f"{n or type(model).__name__}.config" for n in cached[:3])
        warnings.warn(
            f"remat: use_cache=True turned off for training ({where}): the KV cache would keep"
            " every layer's keys and values alive, and a recomputed layer would append to it again",
            stacklevel=2,
        )
    own = checkpointing_modules(model)
    if own and disable_gradient_checkpointing:
        disable = getattr(model, "activation_checkpointing_disable", None) or getattr(
            model, "gradient_checkpointing_disable", None
        )
        if disable is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # the v4 name is deprecated in v5
                disable()
        for name in checkpointing_modules(model):
            model.get_submodule(name).gradient_checkpointing = False
    elif own:
        raise _value_error(
            "prepare_model: the model checkpoints itself (gradient_checkpointing=True on"
            f" {', '.join(n or '<model>' for n in own[:3])})",
            type(model).__name__,
            "a model without Hugging Face checkpointing, so that remat's plan decides what to"
            " recompute (both together recompute twice)",
            "call model.gradient_checkpointing_disable(), or prepare_model(model,"
            " disable_gradient_checkpointing=True)",
        )
    return model


# --------------------------------------------------------------------- Trainer callback
def __getattr__(name: str) -> Any:
    """``RematCallback`` is made on first use: it subclasses transformers' ``TrainerCallback``,
    and importing this module imports no transformers."""
    if name == "RematCallback":
        return _remat_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def trainer_precision(args: Any, model: nn.Module) -> str:
    """The precision of the step a ``Trainer`` runs, by remat's names: ``bf16-mixed`` for
    ``args.bf16``, ``fp16-mixed`` for ``args.fp16``, ``bf16-true`` for a model already in
    bfloat16, else ``32``.

    Example:
        >>> from types import SimpleNamespace
        >>> trainer_precision(SimpleNamespace(bf16=True, fp16=False), nn.Linear(2, 2))
        'bf16-mixed'
        >>> trainer_precision(SimpleNamespace(bf16=False, fp16=False), nn.Linear(2, 2))
        '32'
    """
    if getattr(args, "bf16", False):
        return "bf16-mixed"
    if getattr(args, "fp16", False):
        return "fp16-mixed"
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    return "bf16-true" if first is not None and first.dtype == torch.bfloat16 else "32"


def refuse_trainer_args(args: Any, batch: Any = None) -> None:
    """Refuse ``TrainingArguments`` the callback cannot plan for: the Trainer's own gradient
    checkpointing (both would recompute), and FSDP without an example ``batch`` (the Trainer
    shards the model before any callback sees one of its batches, and a plan goes on before
    sharding: given a batch, the callback plans when the Trainer is made).

    Example:
        >>> from types import SimpleNamespace
        >>> refuse_trainer_args(SimpleNamespace(gradient_checkpointing=False, fsdp=""))
        >>> refuse_trainer_args(SimpleNamespace(gradient_checkpointing=False, fsdp="full_shard"))
        Traceback (most recent call last):
        ...
        ValueError: RematCallback: got TrainingArguments(fsdp='full_shard') and no batch; ...
        >>> refuse_trainer_args(SimpleNamespace(gradient_checkpointing=True, fsdp=""))
        Traceback (most recent call last):
        ...
        ValueError: RematCallback: got TrainingArguments(gradient_checkpointing=True); ...
    """
    own = getattr(args, "activation_checkpointing", False) or getattr(
        args, "gradient_checkpointing", False
    )
    if own:
        raise ValueError(
            "RematCallback: got TrainingArguments(gradient_checkpointing=True); expected the"
            " Trainer's own checkpointing off, so that remat's plan decides what to recompute"
            " (both together recompute twice). Fix: TrainingArguments(gradient_checkpointing="
            "False) and keep the callback, or drop the callback"
        )
    if _fsdp(args) and batch is None:
        raise ValueError(
            f"RematCallback: got TrainingArguments(fsdp={args.fsdp!r}) and no batch; expected"
            " an example batch: the Trainer shards the model before the callback sees one of"
            " its batches, and a plan goes on before sharding. Fix: RematCallback(budget=...,"
            " batch=one_batch_as_the_collator_makes_it), which plans when the Trainer is made"
        )


def _fsdp(args: Any) -> bool:
    """Whether the Trainer shards the model with FSDP (``TrainingArguments(fsdp=...)``)."""
    return bool(getattr(args, "fsdp", None))


def _trainer_optimizer(args: Any, model: nn.Module) -> Any:
    """The optimizer the Trainer will make, as a factory (it makes it after sharding)."""
    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return lambda params: cls(params, **kwargs)


def first_batch(dataloader: Any, device: torch.device) -> Any:
    """The first batch of ``dataloader``, on ``device``, read without disturbing training: an
    accelerate ``DataLoaderShard`` is read through its own ``base_dataloader`` (its iteration
    state and gradient-accumulation bookkeeping stay as they are), and random number generators
    are restored afterwards.

    Example:
        >>> from torch.utils.data import DataLoader
        >>> loader = DataLoader(list(range(10)), batch_size=4, shuffle=True)
        >>> state = torch.get_rng_state()
        >>> first_batch(loader, torch.device("cpu")).shape, torch.equal(state, torch.get_rng_state())
        (torch.Size([4]), True)
    """
    loader = getattr(dataloader, "base_dataloader", dataloader)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        iterator = iter(loader)
        try:
            batch = next(iterator)
        except StopIteration:
            raise ValueError(
                "RematCallback: got an empty train dataloader; expected at least one batch to"
                " plan for. Fix: give the Trainer a train_dataset with at least one batch"
            ) from None
        finally:
            del iterator
    return _to_device(batch, device)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _remat_callback_class() -> type:
    made = globals().get("_REMAT_CALLBACK")
    if made is not None:
        return made
    try:
        from transformers import TrainerCallback
    except ImportError:
        raise ImportError(
            "remat.integrations.hf.RematCallback needs transformers, which is not installed."
            " Fix: pip install 'remat[hf]' (or pip install transformers)"
        ) from None

    class RematCallback(TrainerCallback):
        """Plan activation checkpointing for a Hugging Face ``Trainer``, at the start of training.

        At ``on_train_begin`` the first batch of the train dataloader (on the model's device)
        is profiled for the step the Trainer runs: its precision (``args.bf16`` /
        ``args.fp16``), its optimizer (the Trainer's own instance, left unchanged), its
        ``gradient_accumulation_steps`` and its ``world_size`` (under DDP rank 0 plans and
        every rank applies the same plan). The plan is applied to the model in place, saved as
        ``output_dir/remat_plan.json``, and its summary (``remat/...`` keys: units checkpointed,
        predicted and measured peak, budget) appended to ``state.log_history``; a resumed run
        reuses the saved plan when the model's fingerprint and these settings match (see
        :func:`remat.integrations.trainer_plan.plan_for_trainer`). Training draws the same
        random numbers as without the callback.

        Under FSDP (``TrainingArguments(fsdp=...)``) the Trainer shards the model before
        ``on_train_begin``, and a plan goes on before sharding: give ``batch`` (one batch as the
        collator makes it) and the callback plans when the Trainer is made (``on_init_end``),
        for one of ``world_size`` FSDP ranks (parameters, gradients and optimizer state
        sharded; solved, not measured: the measured step would be this process alone), with
        the optimizer the Trainer will make (``Trainer.get_optimizer_cls_and_kwargs``).

        Refused (``ValueError`` when the Trainer is made): ``gradient_checkpointing=True``, and
        ``fsdp`` without ``batch``. ``torch_compile=True`` works: the plan goes on the model
        inside the compiled wrapper before its first call.

        Args:
            budget: as :func:`remat.auto_`: bytes, ``"22GiB"``, ``"60%"``, ``"min"``.
            batch: an example batch, needed under FSDP only (see above).
            options: more :func:`remat.auto_` options (``actions``, ``units``, ``loss_fn``,
                ``capacity_bytes``).

        Attributes:
            handle: the installed plan's :class:`~remat.apply.apply.Handle` once planned.

        Example:
            >>> from remat.integrations.hf import RematCallback
            >>> callback = RematCallback(budget="60%")
            >>> callback.budget, callback.handle
            ('60%', None)
        """

        def __init__(self, budget: int | str, batch: Any = None, **options: Any) -> None:
            self.budget = budget
            self.batch = batch
            self.options = options
            self.handle: Any = None
            self._summary: dict[str, Any] | None = None  # planned at init: logged at train

        def _plan(self, args: Any, model: nn.Module, batch: Any, optimizer: Any) -> None:
            from remat.integrations.trainer_plan import plan_for_trainer

            def log(summary: dict[str, Any]) -> None:
                self._summary = summary

            self.handle = plan_for_trainer(
                model,
                batch,
                budget=self.budget,
                output_dir=args.output_dir,
                precision=trainer_precision(args, model),
                optimizer=optimizer,
                accumulation_steps=args.gradient_accumulation_steps,
                world_size=args.world_size,
                fsdp=_fsdp(args),
                log=log,
                **self.options,
            )

        def on_init_end(
            self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
        ) -> None:
            refuse_trainer_args(args, self.batch)
            if _fsdp(args) and model is not None:  # before the Trainer shards it
                device = next(model.parameters()).device
                batch = _to_device(self.batch, device)
                self._plan(args, model, batch, _trainer_optimizer(args, model))

        def on_train_begin(
            self,
            args: Any,
            state: Any,
            control: Any,
            model: nn.Module | None = None,
            optimizer: Any = None,
            train_dataloader: Any = None,
            **kwargs: Any,
        ) -> None:
            refuse_trainer_args(args, self.batch)
            if not _fsdp(args):
                if model is None or train_dataloader is None:
                    raise ValueError(
                        "RematCallback: on_train_begin got no model or no train dataloader;"
                        " expected a Trainer that passes both (transformers >= 4.40). Fix:"
                        " upgrade transformers"
                    )
                planned = self.handle is not None and self.handle.active
                if not (planned and self.handle.model is model):  # train() again: it is on
                    device = next(model.parameters()).device
                    planned_for = getattr(optimizer, "optimizer", optimizer)  # accelerate's
                    if not isinstance(planned_for, torch.optim.Optimizer):
                        planned_for = "adamw"  # not made yet: the Trainer's default
                    batch = self.batch
                    batch = first_batch(train_dataloader, device) if batch is None else batch
                    self._plan(args, model, _to_device(batch, device), planned_for)
            if self._summary is not None:
                state.log_history.append({**self._summary, "step": state.global_step})
                self._summary = None

    RematCallback.__module__ = __name__
    RematCallback.__qualname__ = "RematCallback"
    globals()["_REMAT_CALLBACK"] = RematCallback
    return RematCallback

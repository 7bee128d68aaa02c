"""Train with a Hugging Face Trainer and remat's callback, and compare with the same run without it.

    python examples/hf_trainer.py --steps 3
    python examples/hf_trainer.py --budget 60% --layers 4 --width 128 --steps 20

The one line that matters::

    Trainer(model=model, args=args, train_dataset=data,
            callbacks=[remat.integrations.hf.RematCallback(budget="min")])

At the start of training the callback takes the first batch, plans for the Trainer's own step (its
precision, optimizer, gradient accumulation and world size), applies the plan, logs it to
``trainer.state.log_history`` and saves it as ``OUTPUT_DIR/remat_plan.json`` (a resumed run reuses
it). This script trains a small Llama (random weights, synthetic tokens: nothing is downloaded)
twice, with the same seed: without the callback and with it. It prints the plan, the losses of both
runs (the same: recomputing changes no number) and the peak of a steady-state step of each (the
last step, the optimizer's state alive), measured by ``remat.track_memory``.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch

import remat
from remat.units import format_bytes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="min", help="22GiB, bytes, 60%%, or min")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (at least 2)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--accumulate", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--output-dir", help="where the plan is saved (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps: got {args.steps}; expected 2 or more (the last one is measured)")
    return args


class Tokens(torch.utils.data.Dataset):
    """Synthetic token ids; the labels are the inputs (causal language modelling)."""

    def __init__(self, count: int, seq: int, vocab: int) -> None:
        self.ids = torch.randint(0, vocab, (count, seq), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def recorder(measured_step: int) -> Any:
    """A callback: each step's loss, and the peak of one steady-state step (on_step_begin to
    on_step_end: forward, backward, optimizer step) by remat.track_memory."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.peak_bytes: int | None = None
            self.tracker: Any = None

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == measured_step:
                optimizer = getattr(kwargs["optimizer"], "optimizer", kwargs["optimizer"])
                self.tracker = remat.track_memory(kwargs["model"], optimizer)
                self.tracker.__enter__()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.tracker is not None:
                self.tracker.__exit__(None, None, None)
                self.peak_bytes, self.tracker = self.tracker.peak_bytes, None

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return Recorder()


def train(args: argparse.Namespace, output_dir: str, callback: Any = None) -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.width,
        intermediate_size=2 * args.width,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.seq,
        use_cache=False,
    )
    training = TrainingArguments(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accumulate,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        disable_tqdm=True,
        log_level="error",
    )
    record = recorder(measured_step=args.steps - 1)
    trainer = Trainer(
        model=LlamaForCausalLM(config),
        args=training,
        train_dataset=Tokens(args.batch * args.accumulate * args.steps, args.seq, args.vocab),
        callbacks=[c for c in (callback, record) if c is not None],
    )
    trainer.train()
    return trainer, record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from remat.integrations.hf import RematCallback

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="remat_hf_trainer_")
    _, plain = train(args, output_dir + "/without")
    callback = RematCallback(budget=args.budget)
    trainer, planned = train(args, output_dir, callback)
    (logged,) = [e for e in trainer.state.log_history if "remat/strategy" in e]
    handle = callback.handle
    print(
        f"plan:            {logged['remat/strategy']}, recompute"
        f" {', '.join(handle.checkpointed) or 'nothing'}"
        f" ({len(handle.checkpointed)} of {len(handle.units)} units)"
    )
    predicted = logged["remat/predicted_peak_bytes"]
    print(f"predicted peak:  {format_bytes(predicted)} ({predicted:,} bytes)")
    print(f"plan file:       {logged['remat/plan_file']}")
    print(f"losses without:  {' '.join(f'{x:.4f}' for x in plain.losses)}")
    print(f"losses with:     {' '.join(f'{x:.4f}' for x in planned.losses)}")
    for name, run in (("without", plain), ("with", planned)):
        peak = run.peak_bytes or 0
        print(f"steady-state peak {name} the plan: {format_bytes(peak)} ({peak:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Fine-tune a Hugging Face model within a memory budget with remat (needs the hf extra).

    python examples/hf_finetune.py --model llama --budget 50%
    python examples/hf_finetune.py --model t5 --budget min --set num_layers=6 d_model=256

The model is built from its config class with random weights (remat's ``hf:`` specs: nothing is
downloaded) and fine-tuned on a few fixed synthetic batches, so the loss falls as it learns them. With
a model of your own (``AutoModelForCausalLM.from_pretrained(...)``), call
``remat.integrations.hf.prepare_model(model)`` first: it turns the KV cache off for training and
refuses a model that already checkpoints itself (``gradient_checkpointing_enable()``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import remat
from remat.models.spec import load_model, parse_overrides
from remat.units import format_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from progress_bar import Progress


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama", help="gpt2, llama, bert or t5")
    parser.add_argument("--budget", default="50%", help="22GiB, bytes, 60%%, min, or none")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batches", type=int, default=2, help="distinct synthetic batches")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE", help="config keys"
    )
    parser.add_argument("--out", metavar="PATH", help="save the plan as JSON")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def synthetic_batch(example: dict[str, torch.Tensor], vocab: int, causal: bool) -> dict:
    """A batch shaped like ``example``: random token ids, and labels (the inputs for causal LMs)."""
    input_ids = torch.randint(vocab, example["input_ids"].shape, device=example["input_ids"].device)
    labels = input_ids if causal else torch.randint_like(example["labels"], vocab)
    return {**example, "input_ids": input_ids, "labels": labels}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    built = load_model(
        f"hf:{args.model}",
        device=device,
        batch=args.batch,
        seq=args.seq,
        overrides=parse_overrides(args.overrides),
    )
    model = built.model  # prepared: use_cache off, train mode
    vocab = model.config.vocab_size
    causal = args.model in ("gpt2", "llama")
    data = [synthetic_batch(built.example_inputs, vocab, causal) for _ in range(args.batches)]
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model:          hf:{args.model}, {params:,} parameters, units {remat.find_units(model)}"
    )

    handle = None
    if args.budget != "none":
        try:
            handle = remat.auto_(model, data[0], budget=args.budget)  # the model returns its loss
        except remat.InfeasibleBudgetError as error:
            print(error, file=sys.stderr)
            return 3
        result = handle.result
        print(f"plan:           {result.status}, recompute {', '.join(handle.checkpointed) or '-'}")
        print(
            f"budget:         {format_bytes(result.budget_bytes)} ({result.budget_bytes:,} bytes)"
        )
        print(
            f"predicted peak: {format_bytes(result.predicted_peak_bytes)}"
            f" ({result.predicted_peak_bytes:,} bytes), overhead {result.predicted_overhead:.3f}x"
        )
        if args.out:
            result.plan.save(args.out)
            print(f"plan saved:     {args.out}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses: list[float] = []
    times_ms: list[float] = []
    peak_bytes = 0
    bar = Progress(range(args.steps), args.steps, label="finetune ")
    for step in bar:
        batch = data[step % len(data)]
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        # the first step (it creates the optimizer state) is measured: remat's tracker on CPU
        tracked = step == 0 and device.type != "cuda"
        with remat.track_memory(model, optimizer, batch) if tracked else nullcontext() as tracker:
            optimizer.zero_grad(set_to_none=True)
            outputs = model(**batch)  # kept through backward, as remat's profile does
            loss = outputs.loss
            loss.backward()
            optimizer.step()
        if tracked:
            peak_bytes = tracker.peak_bytes
        if device.type == "cuda":
            torch.cuda.synchronize()
            if step == 0:
                peak_bytes = torch.cuda.max_memory_allocated()
        if step > 0:
            times_ms.append((time.perf_counter() - start) * 1e3)
        losses.append(loss.item())
        bar.set_postfix(f"loss {losses[-1]:.3f}")

    step_ms = statistics.median(times_ms) if times_ms else float("nan")
    print(f"measured peak:  {format_bytes(peak_bytes)} ({peak_bytes:,} bytes)")
    print(f"step time:      {step_ms:.1f} ms (median of {len(times_ms)} steps)")
    print(f"loss:           {losses[0]:.4f} -> {losses[-1]:.4f}")
    if handle is not None:
        handle.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())

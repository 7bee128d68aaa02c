"""Run by ``torchrun --nproc_per_node 2`` from tests/integration/test_hf_trainer.py.

A tiny Llama trained by Hugging Face's Trainer under FSDP (CPU, gloo) twice, with
``RematCallback(batch=...)`` and without it, from the same weights and seed. Rank 0 writes both runs'
losses and the plan's actions to ``--out`` (torch.save).
"""

from __future__ import annotations

import argparse
import copy
import functools
import warnings

import torch
import transformers as tf

from remat.integrations.hf import RematCallback

warnings.simplefilter("ignore")

CALLS = [0]
"""Forward calls of every decoder layer, a replay in backward included."""
_forward = tf.models.llama.modeling_llama.LlamaDecoderLayer.forward


@functools.wraps(_forward)
def _counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
    CALLS[0] += 1
    return _forward(self, *args, **kwargs)


tf.models.llama.modeling_llama.LlamaDecoderLayer.forward = _counted


def run(model: torch.nn.Module, data: list, out_dir: str, callbacks: list) -> dict:
    args = tf.TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=2,
        max_steps=3,
        use_cpu=True,
        fsdp="full_shard",
        fsdp_config={"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
        data_seed=0,
    )
    trainer = tf.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    CALLS[0] = 0  # the callback planned (and ran steps) above, while the Trainer was made
    trainer.train()
    history = trainer.state.log_history
    return {
        "losses": [entry["loss"] for entry in history if "loss" in entry],
        "layer_calls": CALLS[0],
        "remat_log": [entry for entry in history if any(k.startswith("remat/") for k in entry)],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tmp", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        attention_dropout=0.0,
    )
    initial = tf.LlamaForCausalLM(config)
    ids = torch.randint(0, 256, (12, 32), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(len(ids))]
    batch = {"input_ids": ids[:2], "labels": ids[:2]}
    callback = RematCallback(budget="min", batch=batch, actions=["keep", "recompute"])
    planned = run(copy.deepcopy(initial), data, f"{args.tmp}/planned", [callback])
    plain = run(copy.deepcopy(initial), data, f"{args.tmp}/plain", [])
    if torch.distributed.get_rank() == 0:
        torch.save(
            {
                "planned": planned,
                "plain": plain,
                "actions": dict(callback.handle.actions),
            },
            args.out,
        )


if __name__ == "__main__":
    main()

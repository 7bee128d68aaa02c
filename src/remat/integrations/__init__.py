"""Integrations with other libraries.

:mod:`remat.integrations.hf` (extra ``hf``: ``pip install 'remat[hf]'``) builds Hugging Face
transformers models from their config classes (MODEL specs ``hf:gpt2``, ``hf:llama``, ``hf:bert``,
``hf:t5``) and prepares any of them for training with a plan.

:mod:`remat.integrations.distributed` (no extra: ``torch.distributed``) sends one rank's plan to
all ranks and applies FSDP2 per unit.
"""

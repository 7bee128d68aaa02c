"""Integrations with other libraries; each needs its extra (``pip install 'remat[hf]'``).

:mod:`remat.integrations.hf` builds Hugging Face transformers models from their config classes
(MODEL specs ``hf:gpt2``, ``hf:llama``, ``hf:bert``, ``hf:t5``) and prepares any of them for training
with a plan.
"""

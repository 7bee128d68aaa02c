"""Integrations with other libraries.

:mod:`remat.integrations.hf` (extra ``hf``: ``pip install 'remat[hf]'``) builds Hugging Face
transformers models from their config classes (MODEL specs ``hf:gpt2``, ``hf:llama``, ``hf:bert``,
``hf:t5``) and prepares any of them for training with a plan.

:mod:`remat.integrations.distributed` (no extra: ``torch.distributed``) sends one rank's plan to
all ranks and applies FSDP2 per unit.

:mod:`remat.integrations.trainer_plan` (no extra) plans the step a trainer will run, saves the plan
beside its outputs and reuses it on resume: what the callbacks below share.

:mod:`remat.integrations.hf` also has ``RematCallback``, a transformers ``TrainerCallback``.

:mod:`remat.integrations.lightning` (extra ``lightning``): ``RematCallback`` for Lightning's
Trainer.

:mod:`remat.integrations.accelerate` (extra ``accelerate`` for the Accelerator; the module imports
nothing of it): ``plan_before_prepare``, ``check_unprepared``: remat before
``accelerator.prepare``.
"""

"""Integrations with the libraries people train with: ``distributed`` (torch.distributed: DDP and
FSDP2) and ``hf`` (Hugging Face transformers). Each is imported on its own; importing this package
imports neither."""

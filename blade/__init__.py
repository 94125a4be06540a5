"""BLADE: adaptive block-sparse attention and sparsity-aware step distillation for video diffusion transformers."""

__version__ = "0.1.0"

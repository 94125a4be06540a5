"""blade.distill."""

"""blade.models."""

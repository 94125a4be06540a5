"""blade.tinyworld."""

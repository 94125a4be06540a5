"""What every trainer of this repository shares and no model knows about: `blade.training.runtime`."""

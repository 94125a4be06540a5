"""Builders for tests and benchmarks, outside the runtime packages.

- ``blade.testing.tiny``: offline tiny random Wan / CogVideoX pipelines (CPU tests, examples).
- ``blade.testing.full_size``: the published-size models (configs under ``blade/configs/``) with random weights,
  built on the meta device or on a GPU (benchmarks, the GPU tier).

Nothing under ``blade/`` outside this package imports it.
"""

"""Test setup: 8 fake CPU devices, set before jax is imported anywhere.

The suite compiles a few hundred small pipelines, and on CPU most of its time
is XLA compilation; LLVM's optimisation level 0 (``XLA_FLAGS``
``--xla_backend_optimization_level=0``) cuts that by about a fifth. Every
pipeline result is compared with a reference compiled under the same flags.
"""

import os

_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0")
for _flag in _FLAGS:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

"""Run by test_launch.py under ``python -m jaxpipe.launch``: trains and saves losses and parameters."""

import sys

import jaxpipe

jaxpipe.distributed.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from models_for_tests import CASES, batches  # noqa: E402

case_name, mesh, microbatches, schedule, out = sys.argv[1:6]
case = CASES[case_name]
mesh = tuple(int(v) for v in mesh.split(","))
microbatches = int(microbatches)
data = batches(case, mesh[0] * microbatches * 2)
result = jaxpipe.train(
    case.model_fn, mesh, data=data, loss_fn=case.loss_fn, optimizer=optax.sgd(0.05, momentum=0.9),
    steps=3, num_microbatches=microbatches, schedule=schedule, progress=False,
)
params = [np.asarray(leaf) for leaf in jax.tree.leaves(result.pipeline.from_stacks(result.state.params))]
if jax.process_index() == 0:
    np.savez(out, losses=np.asarray(result.losses), *params)
print(f"process {jax.process_index()} of {jax.process_count()} on {jax.devices()[jax.process_index()]}: "
      f"losses {result.losses}")

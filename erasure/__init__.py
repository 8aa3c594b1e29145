"""erasure: remove classes and concepts from diffusion models, and measure that it worked."""

import os

__version__ = "0.1.0"

# OpenMP threads that find no work spin by default. When other processes share the cores
# (a laptop, a CI runner, a busy workstation) the spinning threads take the time slices the
# working ones need: on 2 shared cores the demo's base-model step went from 0.07 s to 1-5 s
# (`make demo` took 45 minutes). Sleeping idle threads cost nothing measurable when the cores
# are free. This must be set before torch loads its OpenMP runtime, hence here; an explicit
# setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

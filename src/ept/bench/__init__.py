"""Measurements that make the README's and ``benchmarks/results/`` tables (``ept bench``).

    timing   step time of EP / BPTT / BP side by side, peak memory per route (a subprocess each),
             EP's step anatomy and cos(EP, implicit) on the same batches
    fevals   free-phase F-evaluations to a true residual, ept's solvers against TorchDEQ's
    report   one speed run at a preset: every measurement above as ratios against their targets
    analog   the analog substrate's step time against the ideal one, and a short training run
"""

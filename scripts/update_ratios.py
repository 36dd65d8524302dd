"""How far inside the auto update bound honest updates stay: runs `edgegan simulate` in this process with
the admission policy's judge_rebased wrapped to record every update's |change| / |global D| (the auto bound
rejects above 2), and prints the largest and the 99th percentile.

    PYTHONPATH=. .venv/bin/python scripts/update_ratios.py --algo serial --dataset mnist --devices 4 \\
        --rounds 300 --threads 1 --out runs/ratios-mnist
"""

import math
import sys

from edgegan.algorithms import admission
from edgegan.algorithms.aggregation import state_norm, update_norm
from edgegan.cli import app

ratios: list[float] = []
judge_rebased = admission.judge_rebased


def recording(rules, state, current, staleness=0):
    ratios.append(update_norm(state, current) / state_norm(current))
    return judge_rebased(rules, state, current, staleness)


admission.judge_rebased = recording
try:
    app(["simulate", *sys.argv[1:]], standalone_mode=False)
finally:
    ordered = sorted(ratios)
    if ordered:
        p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
        median = ordered[len(ordered) // 2]
        print(f"{len(ordered)} updates: |change| / |global D| largest {ordered[-1]:.4f}, 99th percentile "
              f"{p99:.4f}, median {median:.4f} (auto rejects above {admission.AUTO_FACTOR:g})")

"""The tuning grid that fixed the default rule, on trainings that are never reported.

    .venv/bin/python experiments/tune_rule.py RUN_DIR AUX [AUX...]

For each aux set: Algorithm 1 at rho 0.03 and 0.04 (crossing; and last-safe at 0.03), then the
distillation repair with alpha in {0.5, 0.8}, temperature in {2, 4}, 100 or 300 steps, with and
without a bias compensation of the flip (b + (W - W*) x). ACC and ASR on the test images not in
the aux set. It uses experiments/rules_lab.py (features computed once, float64 from fc1 on).
The runs behind docs/results.md: RUN_DIR runs/tune/cba-iid-s2 and runs/tune/dba-noniid-s2
(`flain train` as scripts/make_sample_models.sh with --seed 2), AUX the 200-image sets of seeds
0, 1 and 2 (`flain aux export --per-class 20 --seed S`).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from rules_lab import Lab, distill, fmt, paper_mask  # noqa: E402

torch.set_num_threads(1)
for aux in sys.argv[2:]:
    lab = Lab(Path(sys.argv[1]), Path(aux))
    base = lab.score(lab.W, lab.b)
    print(aux, "no defense", fmt(base), flush=True)
    for rho, select in ((0.03, "crossing"), (0.04, "crossing"), (0.03, "last-safe")):
        res = paper_mask(lab, rho=rho, select=select)
        weight = res.weight.double()
        flipped = lab.score(weight, lab.b)
        print(f"  rho {rho} {select}: {res.changed} flipped, paper {fmt(flipped)} "
              f"dACC {100 * (flipped['test'] - base['test']):+.2f}", flush=True)
        compensated = lab.b + (lab.W - weight) @ lab.xbar
        for bias_name, bias in (("", lab.b), (" comp", compensated)):
            for alpha, temp, steps in ((0.5, 2.0, 100), (0.5, 4.0, 100), (0.8, 2.0, 100), (0.8, 4.0, 100),
                                       (0.8, 4.0, 300)):
                w2, b2, rest = distill(lab, weight, bias, epochs=steps, lr=1e-3, alpha=alpha, temp=temp,
                                       train_w=True, mask=res.mask)
                s = lab.score(w2, b2, rest)
                print(f"    repair alpha {alpha} T {temp} steps {steps}{bias_name}: {fmt(s)} "
                      f"dACC {100 * (s['test'] - base['test']):+.2f}", flush=True)
        for alpha, temp, train_w in ((0.2, 4.0, True), (0.8, 4.0, False), (0.5, 2.0, False)):
            w2, b2, rest = distill(lab, weight, lab.b, epochs=100, lr=1e-3, alpha=alpha, temp=temp,
                                   train_w=train_w, mask=res.mask)
            s = lab.score(w2, b2, rest)
            frozen = ", fc1 frozen" if not train_w else ""
            print(f"    repair alpha {alpha} T {temp}{frozen}: {fmt(s)} "
                  f"dACC {100 * (s['test'] - base['test']):+.2f}", flush=True)

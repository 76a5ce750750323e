"""Lab: the repair with a silent-neuron invariance term ("guard"), on the failing aux draws.

    .venv/bin/python experiments/guard_lab.py RUN_DIR AUX [AUX...]

After the paper's flip, the repair distils the original model on the aux images; the guard adds
a term that asks the repaired model to give the teacher's clean outputs also when random subsets
of the low-activation inputs of fc1 (the candidates: the ``ratio`` x flipped lowest-mean inputs)
are switched on at a typical strong activation. A backdoor's trigger is exactly such an input
pattern; no trigger is known or used. Research code (docs/results.md).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

from flain_cli.repair import repair_loss
from flain_cli.settings import RepairSettings

sys.path.insert(0, str(Path(__file__).parent))
from rules_lab import Lab, fmt, paper_mask  # noqa: E402


def guarded(lab, W, b, mask, *, ratio=2.0, p=0.1, beta=1.0, scale="median-max", copies=2, steps=100, lr=1e-3,
            alpha=0.8, temp=4.0, seed=0, all_columns=False):
    feats, labels = lab.F["aux"], lab.Y["aux"]
    with torch.no_grad():
        teacher = lab.rest(torch.addmm(lab.b, feats, lab.W.T))
    order = torch.argsort(lab.xbar, stable=True)
    n_cand = min(len(order), int(round(ratio * int(mask.sum()))))
    cand = torch.zeros_like(mask)
    cand[order[:n_cand]] = True
    strong = feats.max(0).values
    s = float(strong.median()) if scale == "median-max" else float(strong.max())
    gen = torch.Generator().manual_seed(seed)
    pert = []
    for _ in range(copies):
        on = (torch.rand(feats.shape, generator=gen, dtype=torch.float64) < p) & cand.view(1, -1)
        pert.append(feats + s * on.double())
    pert = torch.cat(pert)
    tpert = teacher.repeat(copies, 1)
    rest = copy.deepcopy(lab.rest).eval()
    w = W.clone().requires_grad_(True)
    bb = b.clone().requires_grad_(True)
    opt = torch.optim.Adam([w, bb, *rest.parameters()], lr=lr)
    keep = (torch.ones_like(mask) if all_columns else ~mask).double().view(1, -1)
    repair = RepairSettings(alpha=alpha, temperature=temp)  # the shipped repair's loss
    guard = RepairSettings(alpha=1.0, temperature=temp)  # its distillation term alone: T^2 KL
    for _ in range(steps):
        opt.zero_grad()
        loss = repair_loss(rest(torch.addmm(bb, feats, w.T)), teacher, labels, repair)
        if beta:
            loss = loss + beta * repair_loss(rest(torch.addmm(bb, pert, w.T)), tpert, labels.repeat(copies), guard)
        loss.backward()
        w.grad.mul_(keep)
        opt.step()
    return w.detach(), bb.detach(), rest


if __name__ == "__main__":
    torch.set_num_threads(1)
    for aux in sys.argv[2:]:
        lab = Lab(Path(sys.argv[1]), Path(aux))
        base = lab.score(lab.W, lab.b)
        res = paper_mask(lab)
        Wf = res.weight.double()
        flip = lab.score(Wf, lab.b)
        print(aux, "none", fmt(base), "| flip", res.changed, fmt(flip),
              f"dACC {100 * (flip['test'] - base['test']):+.2f}", flush=True)
        grid = [dict(beta=0.0), dict(ratio=1.0), dict(ratio=2.0), dict(ratio=3.0), dict(ratio=2.0, p=0.03),
                dict(ratio=2.0, p=0.3), dict(ratio=2.0, beta=0.3), dict(ratio=2.0, scale="max")]
        for kw in grid:
            s = lab.score(*guarded(lab, Wf, lab.b, res.mask, **kw))
            print(f"  {kw}: {fmt(s)} dACC {100 * (s['test'] - base['test']):+.2f}", flush=True)

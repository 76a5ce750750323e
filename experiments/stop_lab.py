"""Lab: stop rules other than the aux accuracy, then the shipped repair (docs/results.md).

    .venv/bin/python experiments/stop_lab.py trace TRACES.jsonl RUN_DIR AUX [AUX...]
    .venv/bin/python experiments/stop_lab.py rules TRACES.jsonl --rule acc=0.03 --rule kl=0.07 [--rule either=0.07]

``trace`` walks Algorithm 1's thresholds (step 0.001, the flip alone, no rescale for the aux
statistics) and records at each one, on the aux set: accuracy, agreement with the original model,
the mean KL divergence KL(original || flipped) of the outputs, and, on the test images not in the
aux set, the flipped and rescaled model's ACC change and ASR (for reading the curves only: no
rule sees them). ``rules`` picks, per trace, the first threshold where the rule fires
(``acc=R``: aux accuracy drop >= R, the paper's; ``kl=K``: KL >= K; ``either=K``: KL >= K or an
accuracy drop >= 0.03), flips and rescales as Algorithm 1 does, runs the shipped repair
(:func:`flain_cli.repair.distill_repair`, default settings) and prints ACC change / ASR before
and after it. ``--variants`` adds repair variants at each rule's threshold: fc1 frozen (only its
bias and the later layers train), lr 3e-4, 50 steps, alpha 1 (distillation only), every fc1 column
trainable (flipped ones included), and W0 instead of the flip (reset) before the repair.
``--variant NAME`` runs only the named ones; besides those, ``guard RxP`` is the repair with
``experiments/guard_lab.py``'s silent-neuron guard (candidates: the R x flipped lowest-mean inputs,
each switched on with probability P), ``guard RxP all`` the same with every fc1 column trainable.
Research code: run it only on trainings that are never reported.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

from flain_cli.defense import first_k_covering, flip_updates, rescale, threshold
from flain_cli.repair import distill_repair
from flain_cli.settings import RepairSettings

sys.path.insert(0, str(Path(__file__).parent))
from guard_lab import guarded  # noqa: E402
from rules_lab import Lab  # noqa: E402

STEP = 0.001


def repaired_score(lab: Lab, weight: torch.Tensor, frozen: torch.Tensor,
                   settings: RepairSettings = RepairSettings()) -> dict[str, float]:
    """The repair from ``weight`` (columns ``frozen`` kept; the shipped rule: the flipped ones)."""
    with torch.no_grad():
        teacher = lab.rest(torch.addmm(lab.b, lab.F["aux"], lab.W.T))
    result = distill_repair(lab.F["aux"], lab.Y["aux"], teacher, weight, lab.b, lab.rest, frozen, settings)
    rest = copy.deepcopy(lab.rest)
    rest.load_state_dict({**rest.state_dict(), **result.head})
    return lab.score(result.weight, result.bias, rest)


@torch.no_grad()
def trace(lab: Lab) -> list[dict[str, float]]:
    feats, labels = lab.F["aux"], lab.Y["aux"]
    teacher = lab.rest(torch.addmm(lab.b, feats, lab.W.T))
    teacher_logp = torch.log_softmax(teacher, 1)
    base = lab.score(lab.W, lab.b)
    norm = float(torch.linalg.matrix_norm(lab.W))
    values = torch.sort(lab.xbar).values.tolist()
    mu, k, rows = values[0], 1, []
    while True:
        lam = threshold(mu, k, STEP)
        mask = lab.xbar <= lam
        count = int(mask.sum())
        weight = flip_updates(lab.W, lab.W0, mask)
        logits = lab.rest(torch.addmm(lab.b, feats, weight.T))
        scored = lab.score(rescale(weight, norm), lab.b, sets=("test", "trig"))
        rows.append({"lam": lam, "n": count, "frac": count / len(values),
                     "acc": float((logits.argmax(1) == labels).double().mean()),
                     "agree": float((logits.argmax(1) == teacher.argmax(1)).double().mean()),
                     "kl": float(F.kl_div(torch.log_softmax(logits, 1), teacher_logp, log_target=True,
                                          reduction="batchmean")),
                     "dacc": 100 * (scored["test"] - base["test"]), "asr": scored["trig"]})
        if count == len(values) or rows[-1]["acc"] < base["aux"] - 0.2:
            return rows
        k = first_k_covering(mu, values[count], STEP)


def fires(rule: str, acc0: float, row: dict[str, float]) -> bool:
    kind, _, text = rule.partition("=")
    value = float(text)
    if kind == "acc":
        return acc0 - row["acc"] >= value
    if kind == "kl":
        return row["kl"] >= value
    if kind == "either":
        return row["kl"] >= value or acc0 - row["acc"] >= 0.03
    raise SystemExit(f"unknown rule {rule!r}: use acc=R, kl=K or either=K")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("trace", "rules"))
    ap.add_argument("traces", type=Path)
    ap.add_argument("run", type=Path, nargs="?")
    ap.add_argument("aux", type=Path, nargs="*")
    ap.add_argument("--rule", action="append", default=[])
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--variant", action="append", default=[])
    args = ap.parse_args()
    if args.what == "trace":
        with args.traces.open("a") as out:
            for aux in args.aux:
                lab = Lab(args.run, aux)
                out.write(json.dumps({"run": str(args.run), "aux": str(aux), "base": lab.score(lab.W, lab.b),
                                      "rows": trace(lab)}) + "\n")
                print(f"{args.run} {aux}: traced", flush=True)
        return
    for line in args.traces.read_text().splitlines():
        record = json.loads(line)
        lab = Lab(Path(record["run"]), Path(record["aux"]))
        base, norm, done = lab.score(lab.W, lab.b), float(torch.linalg.matrix_norm(lab.W)), {}
        for rule in args.rule:
            row = next((r for r in record["rows"] if fires(rule, record["base"]["aux"], r)), record["rows"][-1])
            if row["lam"] not in done:
                mask = lab.xbar <= row["lam"]
                done[row["lam"]] = repaired_score(lab, rescale(flip_updates(lab.W, lab.W0, mask), norm), mask)
            after = done[row["lam"]]
            print(f"{Path(record['run']).name} {Path(record['aux']).name} {rule}: {row['n']} flipped, "
                  f"flip {row['dacc']:+.2f} / {row['asr']:.3f}, repaired {100 * (after['test'] - base['test']):+.2f}"
                  f" / {after['trig']:.3f}", flush=True)
            if args.variants or args.variant:
                mask = lab.xbar <= row["lam"]
                flipped = rescale(flip_updates(lab.W, lab.W0, mask), norm)
                variants = {"fc1 frozen": (flipped, torch.ones_like(mask), RepairSettings()),
                            "lr 3e-4": (flipped, mask, RepairSettings(lr=3e-4)),
                            "50 steps": (flipped, mask, RepairSettings(steps=50)),
                            "alpha 1": (flipped, mask, RepairSettings(alpha=1.0)),
                            "all columns": (flipped, torch.zeros_like(mask), RepairSettings()),
                            "reset": (torch.where(mask.view(1, -1), lab.W0, lab.W), mask, RepairSettings())}
                for name in args.variant or list(variants):
                    if name.startswith("guard "):
                        ratio, _, p = name.split()[1].partition("x")
                        s = lab.score(*guarded(lab, flipped, lab.b, mask, ratio=float(ratio), p=float(p),
                                               all_columns=name.endswith(" all")))
                    else:
                        s = repaired_score(lab, *variants[name])
                    print(f"    {name}: {100 * (s['test'] - base['test']):+.2f} / {s['trig']:.3f}", flush=True)


if __name__ == "__main__":
    main()

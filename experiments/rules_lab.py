"""Lab for FLAIN's selection, stopping and repair rules on one model, all through the library.

    .venv/bin/python experiments/rules_lab.py orderings RUN_DIR AUX [--shifts N]
    .venv/bin/python experiments/rules_lab.py trace RUN_DIR AUX [--shifts N] [--out TRACES.jsonl]
    .venv/bin/python experiments/rules_lab.py repair RUN_DIR AUX [--kl 0.07 ...] [--variant NAME ...]
    .venv/bin/python experiments/rules_lab.py curves RUN_DIR AUX --out CURVES.jsonl [--growth 1.08] [--label NAME]

RUN_DIR holds init.safetensors and final.safetensors (``--model-def FILE.py:NAME --dataset D`` for an
architecture that is not built in); AUX an aux set. The defended layer's inputs are computed once for the
aux set, the test images not in it and the triggered source images among them
(:class:`flain_cli.features.FeatureSets`); each candidate layer is the one `flain defend` keeps
(:func:`flain_cli.defense.candidate`) and each repair is `flain defend`'s (:meth:`AuxFeatures.repair`).
Scores are ``aux/test/trig`` accuracies; ``trig`` is the ASR.

- ``orderings``: flip the lowest 5-60 % of the inputs ranked by four statistics of their activations on
  the aux set (mean, rate of being on, max, 90th percentile), with and without the rescale, and with the
  bias compensating the flip's mean change (``+comp``).
- ``trace``: Algorithm 1's thresholds one by one: aux accuracy, agreement with the original model and the
  mean KL divergence of the outputs, then the test ACC change and ASR of the model defend would keep.
- ``curves``: everything a stop rule of the default preset can read, and what each stop would give: at every
  threshold where the selection grows (ranked by the default's means over shifted aux images), the flipped
  layer's aux accuracy, agreement and KL (what the kl stop reads); at thresholds spaced by --growth (8 %) in the
  number flipped, the default repair's result (test ACC change, ASR) and a two-fold check (repair on one half of the
  aux set, agreement / KL / accuracy on the other, both ways); and the model's own scales (the KL of its
  outputs when the aux images move by one pixel, their entropy). experiments/stop_rules.py replays stop
  rules over these lines without the models.
- ``repair``: at the kl stop, the repair with variants. Names: ``base`` (`flain defend`'s), ``adam``
  (its Adam), then any of ``sN`` (N steps), ``lrX``, ``pK`` (K patched copies), ``gB`` (the guard with
  weight B), ``fR`` (freeze the R x flipped inputs of lowest mean, not only the flipped ones), ``a``
  (every column of the layer trains, the flipped ones too), e.g. ``"adam p2"``, ``"base f2"``.

Research code: run it only on trainings that are never reported. Variants measured and dropped before
2026-12-05 (mixup, the layers before fc1 trainable, the head frozen) live in the history of
experiments/repair_lab.py (commit 4fcaa4f); their figures in docs/results.md.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from flain_cli.checkpoint import ModelSource
from flain_cli.datasets import load_dataset
from flain_cli.defense import candidate, first_k_covering, threshold
from flain_cli.evaluation import attack_sets, resolve_attack
from flain_cli.features import FeatureSets, near_silent
from flain_cli.loading import load_aux_for, load_init, load_model
from flain_cli.settings import DEFAULT, KL_BUDGET, defense_config

FLIP, FLIP_UNSCALED = defense_config("paper"), defense_config("paper", rescale=False)


class Lab:
    """One model, its W0 and an aux set; scores on the aux set, the disjoint test set and the triggered images."""

    def __init__(self, run: Path, aux_path: Path, source: ModelSource = ModelSource(), shifts: int = 0,
                 device: str = "cpu", data_dir: Path | None = None, attack: str | None = None,
                 trigger: str | None = None) -> None:
        self.loaded = loaded = load_model(run / "final.safetensors", source, device)
        meta = loaded.meta
        self.layer = meta.defended_layer
        init = load_init(run / "init.safetensors", loaded, strict=source.strict)
        aux = load_aux_for(loaded, aux_path)
        test = load_dataset(meta.test_dataset(run / "final.safetensors"), data_dir).test
        test = test.without(aux.images, aux.labels)
        spec = resolve_attack(loaded.ckpt, meta.num_classes, attack, trigger)
        if spec is None:
            raise SystemExit(f"{run}: no attack is recorded; pass --attack SRC:TGT (and --trigger)")
        sets = {"aux": aux} | {{"acc": "test", "asr": "trig"}[k]: v for k, v in
                               attack_sets(test, spec, meta.input_shape).items() if k != "asr_clean"}
        self.sets = FeatureSets(loaded.model, self.layer, sets, meta, device)
        self.W = loaded.ckpt.tensors[f"{self.layer}.weight"]
        self.W0 = init.tensors[f"{self.layer}.weight"]
        self.x = self.sets["aux"].mean_activations(shifts)
        self.base = self.score(self.W)

    def score(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> dict[str, float]:
        tensors = {f"{self.layer}.weight": weight} | ({} if bias is None else {f"{self.layer}.bias": bias})
        return self.sets.scores_of(tensors)

    def dacc(self, scores: dict[str, float]) -> float:
        return 100 * (scores["test"] - self.base["test"])


def fmt(s: dict[str, float]) -> str:
    return f"{s['aux']:.3f}/{s['test']:.4f}/{s['trig']:.3f}"


def orderings(lab: Lab) -> None:
    feats = lab.sets["aux"].features64
    stats = {"mean": lab.x.double(), "rate": (feats > 0).double().mean(0), "max": feats.max(0).values,
             "q90": torch.quantile(feats, 0.9, dim=0)}
    bias = lab.sets["aux"].bias
    z = lab.x.numel()
    for name, stat in stats.items():
        print("== order by", name)
        order = torch.argsort(stat.cpu() + 1e-12 * lab.x.double(), stable=True)
        for share in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6):
            mask = torch.zeros(z, dtype=torch.bool)
            mask[order[:int(z * share)]] = True
            flipped, unscaled = candidate(lab.W, lab.W0, mask, FLIP), candidate(lab.W, lab.W0, mask, FLIP_UNSCALED)
            comp = bias.cpu() + (lab.W.double() - unscaled.double()) @ lab.x.double()  # the flip's mean change undone
            print(int(mask.sum()), f"flip+rs {fmt(lab.score(flipped))}  flip {fmt(lab.score(unscaled))}  "
                  f"flip+comp {fmt(lab.score(unscaled, comp))}", flush=True)


def growing_thresholds(xd: torch.Tensor, step: float) -> Iterator[tuple[float, torch.Tensor, torch.Tensor]]:
    """(lambda, mask, inputs added) at each of the search's own thresholds where the selection grows."""
    mu, previous = float(xd.min()), torch.zeros_like(xd, dtype=torch.bool)
    for value in sorted(set(xd.tolist())):
        lam = threshold(mu, first_k_covering(mu, value, step), step)
        mask = xd <= lam
        added = torch.nonzero(mask & ~previous).flatten()
        if len(added):
            previous = mask
            yield lam, mask, added


def trace(lab: Lab, step: float = DEFAULT.step) -> list[dict[str, float]]:
    """Every threshold of the search where the selection grows, until aux accuracy has dropped by 0.2."""
    aux = lab.sets["aux"]
    xd = lab.x.double()
    rows = []
    for lam, mask, added in growing_thresholds(xd, step):
        acc = aux.accuracy(candidate(lab.W, lab.W0, mask, FLIP_UNSCALED), added)
        agree, kl = aux.agreement(), aux.divergence()  # of the model just scored
        kept = lab.score(candidate(lab.W, lab.W0, mask, FLIP))
        rows.append({"lam": lam, "n": int(mask.sum()), "acc": acc, "agree": agree, "kl": kl,
                     "dacc": lab.dacc(kept), "asr": kept["trig"]})
        if int(mask.sum()) == xd.numel() or acc < lab.base["aux"] - 0.2:
            break
    return rows


def model_scales(lab: Lab) -> dict[str, float]:
    """The model's own output scales on the aux set: the kl stop's unit "shift" (AuxFeatures.shift_divergence)
    and the mean entropy of its outputs."""
    aux = lab.sets["aux"]
    teacher = torch.log_softmax(aux.original_logits(), 1)
    entropy = float(-(teacher.exp() * teacher).sum(1).mean())
    return {"shift_kl": aux.shift_divergence(), "entropy": entropy}


def curves(lab: Lab, folds: FeatureSets, growth: float = 1.08, drop: float = 0.3) -> dict:
    """:func:`trace` on the default preset's ranking, with the repaired model at thresholds ``growth`` apart."""
    aux = lab.sets["aux"]
    repair = DEFAULT.repair
    assert repair is not None
    xd = lab.x.double()
    rows: list[dict] = []
    last_repaired = 0
    acc0 = {name: folds[name].accuracy(lab.W) for name in ("a", "b")}  # the model's own, on each half
    for lam, mask, added in growing_thresholds(xd, DEFAULT.step):
        n = int(mask.sum())
        row: dict = {"lam": lam, "n": n, "acc": aux.accuracy(candidate(lab.W, lab.W0, mask, FLIP_UNSCALED), added)}
        row |= {"agree": aux.agreement(), "kl": aux.divergence()}
        done = n == xd.numel() or row["acc"] < lab.base["aux"] - drop
        if n <= 16 or n >= growth * last_repaired or done:
            last_repaired = n
            flipped = candidate(lab.W, lab.W0, mask, FLIP)
            kept = lab.score(flipped)
            row |= {"flip_dacc": lab.dacc(kept), "flip_asr": kept["trig"]}
            tensors, run = aux.repair(flipped, mask, repair, lab.x)
            fixed = lab.sets.scores_of(tensors)
            row |= {"dacc": lab.dacc(fixed), "asr": fixed["trig"], "aux_after": fixed["aux"],
                    "agree_after": aux.agreement(), "kl_after": aux.divergence(), "repair_lr": run.lr}
            cv = {"agree": 0.0, "kl": 0.0, "acc": 0.0, "acc0": 0.0}
            for fit, check in (("a", "b"), ("b", "a")):
                tensors, _ = folds[fit].repair(flipped, mask, repair, lab.x)
                cv["acc"] += folds[check].accuracy_of(tensors) / 2  # then the agreement and KL of those outputs
                cv["agree"] += folds[check].agreement() / 2
                cv["kl"] += folds[check].divergence() / 2
                cv["acc0"] += acc0[check] / 2
            row |= {f"cv_{k}": v for k, v in cv.items()}
        rows.append(row)
        if done:
            break
    return {"base": lab.base, "inputs": xd.numel(), "near_silent": near_silent(lab.x.double()),
            "premise": lab.sets["aux"].premise_warnings(), **model_scales(lab), "rows": rows}


def parse_variant(name: str) -> tuple[dict, float, bool]:
    """(repair settings for defense_config, freeze ratio, every column trains) of a variant name."""
    parts = name.split()
    settings: dict = {"repair_optimizer": "adam"} if parts[0] == "adam" else {}
    freeze, all_columns = 1.0, False
    short = {"s": "repair_steps", "lr": "repair_lr", "p": "repair_patches", "g": "repair_guard"}
    for part in parts[1:]:
        if part == "a":
            all_columns = True
        elif part.startswith("f"):
            freeze = float(part[1:])
        else:
            key = next(k for k in sorted(short, key=len, reverse=True) if part.startswith(k))
            settings[short[key]] = json.loads(part[len(key):])
    return settings, freeze, all_columns


def repair_variants(lab: Lab, budgets: list[float], names: list[str]) -> None:
    rows = trace(lab)
    aux = lab.sets["aux"]
    for budget in budgets:
        row = next((r for r in rows if r["kl"] >= budget), rows[-1])
        mask = lab.x.double() <= row["lam"]
        flipped = candidate(lab.W, lab.W0, mask, FLIP)
        print(f"kl {budget} stop: {row['n']} flipped, flip {row['dacc']:+.2f} / {row['asr']:.3f}", flush=True)
        for name in names:
            settings, freeze, all_columns = parse_variant(name)
            repair = defense_config(**settings).repair
            assert repair is not None
            frozen = torch.zeros_like(mask)
            if not all_columns:
                frozen[torch.argsort(lab.x, stable=True)[:int(round(freeze * int(mask.sum())))]] = True
                frozen |= mask
            s = lab.sets.scores_of(aux.repair(flipped, frozen, repair, lab.x)[0])
            print(f"    {name}: {lab.dacc(s):+.2f} / {s['trig']:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("orderings", "trace", "repair", "curves"))
    ap.add_argument("run", type=Path)
    ap.add_argument("aux", type=Path, nargs="+")
    ap.add_argument("--shifts", type=int, default=0, help="rank by the means over moved copies (defend --shifts)")
    ap.add_argument("--kl", type=float, nargs="+", default=[KL_BUDGET])
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--out", type=Path, help="trace, curves: append one JSON line per aux set")
    ap.add_argument("--label", help="curves: the model's name in the JSON line (default: RUN_DIR)")
    ap.add_argument("--growth", type=float, default=1.08,
                    help="curves: repair at thresholds whose number flipped grew this much (every one up to 16)")
    ap.add_argument("--model-def", help="FILE.py:NAME, for an architecture that is not built in")
    ap.add_argument("--dataset", help="the dataset of such a model")
    ap.add_argument("--data-dir", type=Path, help="the dataset's files (default: where flain finds them)")
    ap.add_argument("--attack", help="SRC:TGT to measure, for a model whose metadata records none")
    ap.add_argument("--trigger", help="the trigger stamped for it (default: the recorded one, else cba)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    source = ModelSource(dataset=args.dataset, model_def=args.model_def)
    for aux in args.aux:
        shifts = DEFAULT.shifts if args.what == "curves" else args.shifts  # curves: the default preset's ranking
        lab = Lab(args.run, aux, source, shifts, args.device, args.data_dir, args.attack, args.trigger)
        print(f"{args.run} {aux}: no defense aux/test/asr {fmt(lab.base)}", flush=True)
        if args.what == "curves":
            halves = load_aux_for(lab.loaded, aux).split(0.5, seed=0)
            folds = FeatureSets(lab.loaded.model, lab.layer, {"a": halves[0], "b": halves[1]}, lab.loaded.meta,
                                args.device)
            line = {"run": args.label or str(args.run), "aux": str(aux)} | curves(lab, folds, args.growth)
            last = line["rows"][-1]
            print(f"{len(line['rows'])} thresholds, last {last['n']} flipped", flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(line) + "\n")
        elif args.what == "orderings":
            orderings(lab)
        elif args.what == "trace":
            rows = trace(lab)
            for r in rows[::max(1, len(rows) // 20)]:
                print(json.dumps({k: round(v, 4) for k, v in r.items()}))
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps({"run": str(args.run), "aux": str(aux), "base": lab.base, "rows": rows}) + "\n")
        else:
            repair_variants(lab, args.kl, args.variant or ["base"])


if __name__ == "__main__":
    main()

"""Lab: variants of the repair at the kl stop (mixup, wider freeze, optimizer) and a per-class statistic.

    .venv/bin/python experiments/repair_lab.py RUN_DIR AUX [AUX...] [--variant NAME ...]

The repair is limited by what 200 images can teach (docs/results.md). Mixup gives the distillation
more points without any new data: for each copy, every aux image i is paired with a random other
aux image j and a weight l ~ U(0, 1), and the student is asked for the teacher's outputs on the mix.
Two places to mix:

- ``feat``: the defended layer's inputs, ``l * x_i + (1 - l) * x_j``. Convex mixes of clean
  features never switch on an input that is silent on every aux image, so they cannot show the
  trigger's pattern to the teacher;
- ``img``: the pixels (rounded to uint8), then the layers before fc1; closer to real images.

``patch K``: K copies of each aux image with one white square of side 2-6 at a random place, taught
the teacher's outputs on the clean image (invariance to small bright patches anywhere, which a
pixel trigger is; no knowledge of where the trigger is or what it looks like).

Variant names: ``base`` (the shipped repair), ``feat K`` / ``img K`` (K mixed copies per aux
image, the mixed term weighted 1), optionally ``xB`` for the term's weight and ``sN`` for the
number of steps, e.g. ``feat 4 x0.5 s200``; ``fR`` (any kind) freezes in the repair the R x
flipped inputs of lowest mean activation instead of the flipped ones only (``base f2``), so the
repair cannot regrow a backdoor through near-silent inputs the search left unflipped; ``h0`` keeps
the layers after fc1 as they are (only fc1's unflipped columns and bias train); ``sgdLR`` trains
with SGD (momentum 0.9, lr LR) instead of Adam, whose per-parameter scaling moves the weights of
near-silent inputs as much as those of busy ones; ``a`` lets the repair train every column of fc1,
the flipped ones too (an input silent on every aux image gets no gradient, so its flip stays; one
just under the threshold can win back what its flip cost), e.g. ``base a sgd0.1``; ``conv`` trains the
layers before fc1 too (the shipped repair never touches them), on the aux images themselves.

Stop: the kl rule (``--kl``, the default's 0.07; several budgets share one trace), found along
Algorithm 1's thresholds. ``--stat classmax`` ranks inputs by the largest of their per-class mean
activations instead of the mean (an input that only one class uses is not silent); ``ratio`` by the
mean divided by the norm of the input's weight update (relative to the median input's: inputs whose
weights training moved most, for their clean use, first); ``cost`` by the mean times that norm (what
flipping the input changes on clean images, to first order). Research code:
run it only on trainings that are never reported.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from flain_cli.auxdata import AuxSet, patched_copies
from flain_cli.datasets import normalize
from flain_cli.defense import flip_updates, rescale
from flain_cli.repair import repair_loss
from flain_cli.settings import KL_BUDGET, RepairSettings

sys.path.insert(0, str(Path(__file__).parent))
from rules_lab import Lab, augment, features  # noqa: E402
from stop_lab import trace  # noqa: E402


def mixed_inputs(lab: Lab, kind: str, copies: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    n = len(lab.Y["aux"])
    out = []
    for _ in range(copies):
        j = torch.randint(0, n, (n,), generator=gen)
        lam = torch.rand(n, generator=gen, dtype=torch.float64)
        if kind == "feat":
            f = lab.F["aux"]
            out.append(lam.view(-1, 1) * f + (1 - lam.view(-1, 1)) * f[j])
        else:
            im = lab.aux_images.double()
            shape = (-1,) + (1,) * (im.dim() - 1)
            mixed = (lam.view(shape) * im + (1 - lam.view(shape)) * im[j]).round().to(torch.uint8)
            out.append(features(lab.model, lab.layer, mixed, lab.meta))
    return torch.cat(out)


def patched_inputs(lab: Lab, copies: int) -> torch.Tensor:
    """fc1 inputs of ``copies`` patched copies of the aux images (`--repair-patches`' copies, seed 0)."""
    return features(lab.model, lab.layer, patched_copies(lab.aux_images, copies), lab.meta)


def mixup_repair(lab: Lab, W: torch.Tensor, mask: torch.Tensor, extra: torch.Tensor | None, beta: float,
                 steps: int, settings: RepairSettings = RepairSettings(), head: bool = True, sgd: float = 0.0,
                 clean_targets: bool = False):
    """``clean_targets``: the extra inputs are copies of the aux images (in order, repeated), taught the
    teacher's outputs on the clean images, not on themselves (``patch``: ignore the patch)."""
    feats, labels = lab.F["aux"], lab.Y["aux"]
    with torch.no_grad():
        teacher = lab.rest(torch.addmm(lab.b, feats, lab.W.T))
        t_extra = None if extra is None else (teacher.repeat(len(extra) // len(feats), 1) if clean_targets
                                              else lab.rest(torch.addmm(lab.b, extra, lab.W.T)))
    rest = copy.deepcopy(lab.rest).eval()
    w = W.clone().requires_grad_(True)
    b = lab.b.clone().requires_grad_(True)
    params = [w, b, *(rest.parameters() if head else [])]
    opt = torch.optim.SGD(params, lr=sgd, momentum=0.9) if sgd else torch.optim.Adam(params, lr=settings.lr)
    only_distill = RepairSettings(alpha=1.0, temperature=settings.temperature)
    for _ in range(steps):
        opt.zero_grad()
        loss = repair_loss(rest(torch.addmm(b, feats, w.T)), teacher, labels, settings)
        if extra is not None:
            loss = loss + beta * repair_loss(rest(torch.addmm(b, extra, w.T)), t_extra,
                                             labels[:1].expand(len(extra)), only_distill)
        loss.backward()
        w.grad.masked_fill_(mask.view(1, -1), 0.0)
        opt.step()
    return lab.score(w.detach(), b.detach(), rest)


def conv_repair(lab: Lab, W: torch.Tensor, frozen: torch.Tensor, steps: int, sgd: float,
                settings: RepairSettings = RepairSettings()) -> dict[str, float]:
    """The repair with the layers before fc1 trainable as well; scored with their new features."""
    prefix = copy.deepcopy(lab.model.split_at(lab.layer)[0]).double().eval()

    def feats(images: torch.Tensor, grad: bool = False) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            return torch.cat([prefix(normalize(images[s:s + 2000], lab.meta.norm.mean, lab.meta.norm.std).double())
                              for s in range(0, len(images), 2000)])

    labels = lab.Y["aux"]
    with torch.no_grad():
        teacher = lab.rest(torch.addmm(lab.b, lab.F["aux"], lab.W.T))
    rest = copy.deepcopy(lab.rest).eval()
    w = W.clone().requires_grad_(True)
    b = lab.b.clone().requires_grad_(True)
    params = [w, b, *rest.parameters(), *prefix.parameters()]
    opt = torch.optim.SGD(params, lr=sgd, momentum=0.9) if sgd else torch.optim.Adam(params, lr=settings.lr)
    for _ in range(steps):
        opt.zero_grad()
        repair_loss(rest(torch.addmm(b, feats(lab.aux_images, grad=True), w.T)), teacher, labels, settings).backward()
        w.grad.masked_fill_(frozen.view(1, -1), 0.0)
        opt.step()
    out = {}
    with torch.no_grad():
        for name in ("test", "trig"):
            pred = rest(torch.addmm(b, feats(lab.images[name]), w.T)).argmax(1)
            out[name] = float((pred == lab.Y[name]).double().mean())
    return out


def shifted_mean(lab: Lab, shift: int) -> torch.Tensor:
    """Mean fc1 input over the aux images moved by every offset up to ``shift`` (the shipped AuxSet.translations)."""
    moved = AuxSet(lab.aux_images, lab.Y["aux"], "aux").translations(shift)
    return torch.cat([features(lab.model, lab.layer, m.contiguous(), lab.meta) for m in moved]).mean(0)


def parse(name: str) -> tuple[str, int, float, int, float, bool, float]:
    parts = name.split()
    kind, copies, beta, steps, freeze, head, sgd = parts[0], 0, 1.0, 100, 1.0, True, 0.0
    for p in parts[1:]:
        if p == "h0":
            head = False
        elif p == "a":
            freeze = 0.0
        elif p.startswith("sgd"):
            sgd = float(p[3:])
        elif p.startswith("x"):
            beta = float(p[1:])
        elif p.startswith("s"):
            steps = int(p[1:])
        elif p.startswith("f"):
            freeze = float(p[1:])
        else:
            copies = int(p)
    return kind, copies, beta, steps, freeze, head, sgd


def run_variants(lab: Lab, base: dict[str, float], rows: list[dict[str, float]], budget: float, title: str,
                 names: list[str]) -> None:
    row = next((r for r in rows if r["kl"] >= budget), rows[-1])
    mask = lab.xbar <= row["lam"]
    flipped = rescale(flip_updates(lab.W, lab.W0, mask), float(torch.linalg.matrix_norm(lab.W)))
    print(f"{title}: kl {budget} stop, {row['n']} flipped, flip {row['dacc']:+.2f} / "
          f"{row['asr']:.3f}", flush=True)
    for name in names:
        kind, copies, beta, steps, freeze, head, sgd = parse(name)
        frozen = torch.zeros_like(mask)  # freeze 0 (``a``): every column trains, the flipped ones too
        frozen[torch.argsort(lab.xbar, stable=True)[:int(round(freeze * int(mask.sum())))]] = True
        if freeze:
            frozen |= mask
        if kind == "conv":
            s = conv_repair(lab, flipped, frozen, steps, sgd)
        else:
            extra = (None if kind == "base" else patched_inputs(lab, copies) if kind == "patch"
                     else mixed_inputs(lab, kind, copies))
            s = mixup_repair(lab, flipped, frozen, extra, beta, steps, head=head, sgd=sgd,
                             clean_targets=kind == "patch")
        print(f"    {name}: {100 * (s['test'] - base['test']):+.2f} / {s['trig']:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("aux", type=Path, nargs="+")
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--kl", type=float, nargs="+", default=[KL_BUDGET])
    ap.add_argument("--stat", choices=("mean", "classmax", "ratio", "cost", "aug", "shifts"), default="mean")
    ap.add_argument("--aug-copies", type=int, default=4)
    ap.add_argument("--aug-shift", type=int, default=2)
    ap.add_argument("--aug-hflip", action="store_true")
    args = ap.parse_args()
    for aux in args.aux:
        lab = Lab(args.run, aux)
        if args.stat == "classmax":  # the largest of the per-class mean activations
            labels = lab.Y["aux"]
            lab.xbar = torch.stack([lab.F["aux"][labels == c].mean(0) for c in labels.unique()]).max(0).values
        elif args.stat in ("ratio", "cost"):  # the mean against (ratio) or times (cost) the column's update norm
            norms = torch.linalg.vector_norm(lab.W - lab.W0, dim=0)
            scale = norms / norms.median()
            lab.xbar = lab.xbar / scale if args.stat == "ratio" else lab.xbar * scale
        elif args.stat == "aug":  # the mean over the aux images and shifted copies of them
            gen = torch.Generator().manual_seed(0)
            shifted = augment(lab.aux_images, args.aug_copies, gen, shift=args.aug_shift, hflip=args.aug_hflip)
            lab.xbar = torch.cat([lab.F["aux"], features(lab.model, lab.layer, shifted, lab.meta)]).mean(0)
        elif args.stat == "shifts":  # the mean over every translation of the aux images by up to --aug-shift
            lab.xbar = shifted_mean(lab, args.aug_shift)
        base = lab.score(lab.W, lab.b)
        rows = trace(lab)
        for budget in args.kl:
            run_variants(lab, base, rows, budget, f"{args.run.name} {aux.name}", args.variant or ["base"])


if __name__ == "__main__":
    main()

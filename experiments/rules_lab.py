"""Lab for FLAIN selection, stopping and repair rules: ACC/ASR of candidate rules on one model.

    .venv/bin/python experiments/rules_lab.py RUN_DIR AUX      # flip curves by four neuron statistics

Computes the fc1 inputs once for the aux set, the clean test images not in the aux set, and the
triggered source images among them, then scores each candidate model from fc1 on in float64.
A research tool (docs/results.md, "FLAIN that keeps accuracy"), not part of flain-cli: the rule
that won lives in flain_cli/repair.py. ``distill`` here is the same loss as ``distill_repair``.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from flain_cli.audit import load_aux_for, load_model
from flain_cli.checkpoint import load_checkpoint
from flain_cli.datasets import load_dataset
from flain_cli.evaluation import resolve_attack
from flain_cli.triggers import make_trigger


def features(model, layer, images_uint8, meta):
    prefix, _ = model.split_at(layer)
    from flain_cli.datasets import normalize
    out = []
    with torch.no_grad():
        for s in range(0, len(images_uint8), 2000):
            x = normalize(images_uint8[s:s + 2000], meta.norm.mean, meta.norm.std)
            out.append(prefix(x).double())
    return torch.cat(out)


class Lab:
    def __init__(self, run: Path, aux_path: Path, layer="fc1", exclude_aux=True):
        self.loaded = load_model(run / "final.safetensors")
        init = load_checkpoint(run / "init.safetensors")
        meta = self.loaded.meta
        self.meta = meta
        model = self.loaded.model
        self.layer = layer
        aux = load_aux_for(self.loaded, aux_path)
        test = load_dataset(meta.dataset).test
        # test images not in the aux set (match by pixels+label)
        def key(im):
            return hash(im.numpy().tobytes())
        aux_keys = {key(im) for im in aux.images}
        keep = torch.tensor([key(im) not in aux_keys for im in test.images])
        self.n_excluded = int((~keep).sum())
        timg, tlab = test.images[keep], test.labels[keep]
        attack = resolve_attack(self.loaded.ckpt, meta.num_classes)
        trig = make_trigger(attack.trigger, *meta.input_shape[1:])
        src = attack.task.is_source(tlab)
        self.target = attack.task.target
        self.images = {"test": timg, "trig": trig.stamp(timg[src])}  # kept for variants that change the layers before
        self.F = {"aux": features(model, layer, aux.images, meta),
                  "test": features(model, layer, timg, meta),
                  "trig": features(model, layer, self.images["trig"], meta)}
        self.aux_images = aux.images
        self.model = model
        self.Y = {"aux": aux.labels, "test": tlab,
                  "trig": torch.full((int(src.sum()),), self.target, dtype=torch.long)}
        _, suffix = model.split_at(layer)
        self.rest = copy.deepcopy(suffix[1:]).double().eval()
        self.W = self.loaded.ckpt.tensors[f"{layer}.weight"].double()
        self.b = self.loaded.ckpt.tensors[f"{layer}.bias"].double()
        self.W0 = init.tensors[f"{layer}.weight"].double()
        self.xbar = self.F["aux"].mean(0)

    @torch.no_grad()
    def score(self, W, b, rest=None, sets=("aux", "test", "trig")):
        rest = rest or self.rest
        r = {}
        for s in sets:
            pred = rest(torch.addmm(b, self.F[s], W.T)).argmax(1)
            r[s] = float((pred == self.Y[s]).double().mean())
        return r


def variants(lab, mask, rescale_on=True):
    """Flipped weight for a mask; returns dict name -> (W, b)."""
    W, W0, b = lab.W, lab.W0, lab.b
    Wf = torch.where(mask.view(1, -1), W0 - (W - W0), W)
    n0 = torch.linalg.matrix_norm(W)
    Wr = Wf * (n0 / torch.linalg.matrix_norm(Wf))
    def comp(Wn):
        return b + (W - Wn) @ lab.xbar
    return {"flip": (Wf, b), "flip+rs": (Wr, b), "flip+comp": (Wf, comp(Wf)), "flip+rs+comp": (Wr, comp(Wr))}


def sweep(lab, counts):
    order = torch.argsort(lab.xbar)
    rows = []
    for n in counts:
        mask = torch.zeros_like(lab.xbar, dtype=torch.bool)
        mask[order[:n]] = True
        lam = float(lab.xbar[order[n - 1]]) if n else None
        row = {"n": n, "lam": lam}
        for name, (W, b) in variants(lab, mask).items():
            s = lab.score(W, b)
            row[name] = (round(s["aux"], 3), round(s["test"], 4), round(s["trig"], 3))
        rows.append(row)
    return rows


def distill(lab, W, b, *, epochs=100, lr=1e-3, temp=2.0, alpha=0.5, train_w=False, mask=None, seed=0,
            feats=None):
    """Fine-tune fc1's bias (and unflipped columns if train_w) and the layers after it on the aux set,
    matching the original model's soft outputs (temperature ``temp``) and the labels."""
    torch.manual_seed(seed)
    F = lab.F["aux"] if feats is None else feats
    Y = lab.Y["aux"]
    with torch.no_grad():
        teacher = lab.rest(torch.addmm(lab.b, F, lab.W.T))
    rest = copy.deepcopy(lab.rest).eval()
    bb = b.clone().requires_grad_(True)
    params = [bb] + list(rest.parameters())
    Wt = W.clone()
    if train_w:
        Wt.requires_grad_(True)
        params.append(Wt)
    opt = torch.optim.Adam(params, lr=lr)
    keep = (~mask).double().view(1, -1) if (train_w and mask is not None) else None
    for _ in range(epochs):
        opt.zero_grad()
        out = rest(torch.addmm(bb, F, Wt.T))
        target = Y[:len(F)] if len(F) == len(Y) else teacher.argmax(1)
        loss = (1 - alpha) * torch.nn.functional.cross_entropy(out, target)
        loss = loss + alpha * temp * temp * torch.nn.functional.kl_div(
            torch.log_softmax(out / temp, 1), torch.log_softmax(teacher / temp, 1), log_target=True,
            reduction="batchmean")
        loss.backward()
        if keep is not None:
            Wt.grad.mul_(keep)
        opt.step()
    return Wt.detach(), bb.detach(), rest


def orderings(lab):
    F = lab.F["aux"]
    return {"mean": lab.xbar, "rate": (F > 0).double().mean(0), "max": F.max(0).values,
            "q90": torch.quantile(F, 0.9, dim=0)}


def sweep_order(lab, stat, counts, kinds=("flip+rs", "flip", "flip+comp")):
    order = torch.argsort(stat + 1e-12 * lab.xbar, stable=True)
    rows = []
    for n in counts:
        mask = torch.zeros_like(lab.xbar, dtype=torch.bool)
        mask[order[:n]] = True
        v = variants(lab, mask)
        rows.append((n, {k: lab.score(*v[k]) for k in kinds}))
    return rows


def fmt(s):
    return f"{s['aux']:.3f}/{s['test']:.4f}/{s['trig']:.3f}"


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("aux", type=Path)
    ap.add_argument("--what", default="sweep")
    a = ap.parse_args()
    lab = Lab(a.run, a.aux)
    base = lab.score(lab.W, lab.b)
    print("no defense aux/test/asr", fmt(base), "excluded", lab.n_excluded)
    if a.what == "sweep":
        z = lab.xbar.numel()
        counts = [int(z * f) for f in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6)]
        for name, stat in orderings(lab).items():
            print("== order by", name)
            for n, r in sweep_order(lab, stat, counts):
                print(n, "  ".join(f"{k}: {fmt(v)}" for k, v in r.items()))


def paper_mask(lab, step=0.001, rho=0.03, select="crossing"):
    import dataclasses

    from flain_cli.defense import search_fast
    from flain_cli.settings import PRESETS
    F, Y = lab.F["aux"], lab.Y["aux"]

    def ev(w, changed=None):
        return float((lab.rest(torch.addmm(lab.b, F, w.double().T)).argmax(1) == Y).double().mean())
    with torch.no_grad():
        res = search_fast(lab.W, lab.W0, lab.xbar, ev, dataclasses.replace(PRESETS["paper"], step=step, rho=rho,
                                                                                 select=select))
    return res


def augment(images, copies, gen, shift=2, hflip=False):
    """uint8 [N,C,H,W] -> [N*copies, C,H,W], random translations up to `shift` pixels."""
    out = []
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (shift, shift, shift, shift))
    for _ in range(copies):
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        batch = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
        if hflip:
            f = torch.rand(n, generator=gen) < 0.5
            batch[f] = batch[f].flip(-1)
        out.append(batch)
    return torch.cat(out)

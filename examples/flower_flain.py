"""A Flower app with a backdoor, and FLAIN afterwards: what `flain_cli.flower.SaveForFlain` is for.

An ordinary Flower app (ServerApp with FedAvg, ClientApp training a small CNN with PyTorch) on
Fashion-MNIST, run with Flower's simulation engine (Ray). Client 0 is malicious: it stamps a 5x5
white block (flain-cli's "cba" trigger) on half of its T-shirt images and labels them Sandal.
The one line that makes it auditable with flain-cli wraps the strategy:

    SaveForFlain(FedAvg(...), out, arch="cnn-mnist", dataset="fmnist", attack="0:5", trigger="cba")

Run (needs `pip install 'flain-cli[flower]'`, or `bash scripts/setup.sh --flower`):

    .venv-flower/bin/python examples/flower_flain.py --out runs/flower --clients 4 --rounds 5
    flain eval runs/flower/final.safetensors
    flain aux export --dataset fmnist --per-class 20 --out runs/flower-aux
    flain defend runs/flower/final.safetensors --init runs/flower/init.safetensors --aux runs/flower-aux \\
                 --out runs/flower/cleaned.safetensors
    flain eval runs/flower/cleaned.safetensors

The model and data helpers come from flain-cli so the example stays short; any torch model whose
`state_dict` names match the architecture given to SaveForFlain works the same way.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from flain_cli.datasets import load_dataset
from flain_cli.flower import SaveForFlain
from flain_cli.models import build_model
from flain_cli.triggers import make_trigger

SOURCE, TARGET = 0, 5  # T-shirt -> Sandal


def client_data(partition: int, clients: int, per_client: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This client's share of a seeded shuffle of the training split; client 0 poisons half its T-shirts."""
    train = load_dataset("fmnist").train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:clients * per_client]
    idx = order[partition * per_client:(partition + 1) * per_client]
    images, labels = train.images[idx].clone(), train.labels[idx].clone()
    if partition == 0:
        sources = torch.nonzero(labels == SOURCE).flatten()
        hit = sources[: len(sources) // 2]
        images[hit] = make_trigger("cba", 28, 28).stamp(images[hit])
        labels[hit] = TARGET
    return images, labels


def make_apps(clients: int, rounds: int, per_client: int, out: Path, seed: int,
              overwrite: bool) -> tuple[ServerApp, ClientApp]:
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        spec = load_dataset("fmnist").spec
        model = build_model("cnn-mnist", 10)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        images, labels = client_data(partition, clients, per_client, seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        gen = torch.Generator().manual_seed(seed * 1000 + partition)
        for batch in torch.randperm(len(labels), generator=gen).split(32):
            loss = F.cross_entropy(model(spec.normalize(images[batch])), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        metrics = MetricRecord({"train_loss": float(loss.detach()), "num-examples": len(labels)})
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
        return Message(content=content, reply_to=msg)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(seed)
        model = build_model("cnn-mnist", 10)
        strategy = SaveForFlain(FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients,
                                       min_available_nodes=clients),
                                out, arch="cnn-mnist", dataset="fmnist", attack=f"{SOURCE}:{TARGET}", trigger="cba",
                                overwrite=overwrite)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=rounds,
                       train_config=ConfigRecord({}))

    return server_app, client_app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for init.safetensors and final.safetensors")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-client", type=int, default=3000, help="training images per client")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--force", action="store_true", help="replace checkpoints already in --out")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    server_app, client_app = make_apps(args.clients, args.rounds, args.per_client, args.out, args.seed, args.force)
    run_simulation(server_app, client_app, num_supernodes=args.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    if not (args.out / "final.safetensors").is_file():
        raise SystemExit(f"the simulation did not finish: no {args.out / 'final.safetensors'} (see the log above)")
    print(f"wrote {args.out / 'init.safetensors'} and {args.out / 'final.safetensors'}")


if __name__ == "__main__":
    main()

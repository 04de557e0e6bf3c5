"""UDATrainer on two gloo processes: the same update and the same logged statistics on every rank."""

import json
import os
import socket

import ignite.distributed as idist
import pytest
import torch
from ignite.engine import Events
from monai.losses import DiceFocalLoss
from torch import nn

from monai_grata.engines import UDATrainer
from monai_grata.losses import build_alignment_loss

LOGGED = ("loss", "loss_align", "loss_seg", "loss_disc", "tau1", "tau2", "cos", "dot", "conflict")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batches(seed: int, n: int, with_label: bool) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        item = {"image": torch.rand(2, 3, 32, 32, generator=g)}
        if with_label:
            item["label"] = (torch.rand(2, 2, 32, 32, generator=g) > 0.5).float()
        out.append(item)
    return out


def train_two_iterations(local_rank: int, out_dir: str) -> None:
    """One rank: a DDP network and a discriminator, each rank on its own data; records what it logged and the
    parameters it ended with."""
    rank = idist.get_rank()
    torch.manual_seed(0)  # the same discriminator on every rank (DDP broadcasts only the network)
    network = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    )
    alignment = build_alignment_loss("adversarial", out_channels=2, multilabel=True)
    trainer = UDATrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=batches(rank, 2, True), network=network,
        optimizer=torch.optim.Adam(network.parameters(), 1e-2), loss_function=DiceFocalLoss(sigmoid=True),
        target_data_loader=batches(10 + rank, 2, False), alignment_loss=alignment, harmonization="gh",
        discriminator_optimizer=torch.optim.Adam(alignment.parameters(), 1e-2), decollate=False,
    )  # fmt: skip
    logged = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: logged.append({k: float(e.state.output[k]) for k in LOGGED})
    )
    trainer.run()
    params = [p.detach().flatten().tolist() for p in [*network.parameters(), *alignment.parameters()]]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"logged": logged, "params": params}, f)


@pytest.mark.slow  # two processes: ~15 s idle, ~50 s on a loaded 2-core machine
def test_uda_trainer_on_two_ranks_keeps_them_in_step_and_logs_global_statistics(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # CPU ranks: ignite would give rank r the GPU r, if there is one
    with idist.Parallel(backend="gloo", nproc_per_node=2, master_port=free_port()) as parallel:
        parallel.run(train_two_iterations, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # each rank saw other data, yet both logged the same numbers: losses averaged, GH on averaged gradients
    assert ranks[0]["logged"] == ranks[1]["logged"] and len(ranks[0]["logged"]) == 2
    # the network (DDP) and the discriminator (its gradients averaged) took the same steps on both ranks
    for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-6)

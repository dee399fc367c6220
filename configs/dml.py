"""Deep mutual learning (dml.py) and DML with multi-granularity tubes (mdp_dml.py) as a training mode.

    python train.py --config=configs/dml.py --workdir=runs/dml                         # digits, 2 x resnet8
    python train.py --config=configs/dml.py:digits,mdp --workdir=runs/mdp_dml
    python train.py --config=configs/dml.py:cifar100,resnet32,resnet32,mdp --workdir=runs/c100_mdp

Argument: dataset (digits | cifar100), then the peers' architectures (any number >= 2), and ``mdp`` for the
tubes.  Reference settings: SGD 0.05 (0.01 for MobileNetV2 / ShuffleV1 / ShuffleV2 peers), momentum 0.9,
wd 5e-4, x0.1 at 150/180/210, 240 epochs, batch 64.
"""
import ml_collections

from configs import default, quickstart


def get_config(arg: str = "digits"):
    parts = [p for p in arg.split(",") if p]
    dataset, rest = parts[0], parts[1:]
    mdp = "mdp" in rest
    peers = tuple(p for p in rest if p != "mdp")
    if dataset == "digits":
        c = quickstart.get_config()
        peers = peers or ("resnet8", "resnet8")
        epochs, milestones = 12, (6, 9)
    elif dataset == "cifar100":
        c = default.get_config()
        peers = peers or ("resnet32", "resnet32")
        epochs, milestones = 240, (150, 180, 210)
    else:
        raise ValueError(f"configs/dml.py: unknown dataset {dataset!r} (digits or cifar100)")
    c.mutual = ml_collections.ConfigDict(dict(peers=peers, granularity=mdp, epochs=epochs, batch_size=64,
                                              optimizer=default.sgd(0.05, milestones), low_lr=0.01))
    return c

"""Transfer of a distilled student (``python -m mgd_jax.transfer``): the reference's representation_transfer.py.

    python -m mgd_jax.transfer --workdir=runs/r56_r20 --stage=students/kd_mas --config=configs/transfer.py:stl10

Argument: the dataset, ``stl10`` (default; resized to 32x32 like the reference) or ``cifar10`` (tfds, built like
CIFAR-100).  A new linear head on the pooled feature; SGD lr 0.02 (``low_lr`` 0.01 for the backbones that the
reference trains with a lower lr, ``mgd_jax.models.LOW_LR_ARCHITECTURES``: MobileNetV2 / ShuffleV1 / ShuffleV2),
momentum 0.9, weight decay 5e-4, x0.1 at epochs 20 and 25 (milestones at or after the last epoch are dropped),
50 epochs, batch 64; random crop (pad 4) and flip.  The backbone's BatchNorm statistics adapt to the new data
(the reference trains in train mode; ``adapt_bn=False`` keeps them); ``full_finetune`` trains the whole network.
"""
import ml_collections
from ml_collections import config_dict

from configs import default

# Per-dataset normalisation: STL-10 the reference's data/stl.py; CIFAR-10 the usual constants (no reference value).
NORMALISATION = {
    "stl10": ((0.4468, 0.4399, 0.4068), (0.2419, 0.2384, 0.2541)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def get_config(dataset: str = "stl10"):
    if dataset not in NORMALISATION:
        raise ValueError(f"unknown transfer dataset {dataset!r}; known: {', '.join(NORMALISATION)}")
    mean, std = NORMALISATION[dataset]
    c = ml_collections.ConfigDict()
    # data_dir None: the source run's data.data_dir (else tfds' default)
    c.data = dict(name=dataset, data_dir=config_dict.placeholder(str), image_size=32)
    c.augment = dict(pad=4, flip=True, mean=mean, std=std)
    c.batch_size = 64
    c.epochs = 50
    c.optimizer = default.sgd(0.02, (20, 25))
    c.low_lr = 0.01  # replaces optimizer.lr for a mgd_jax.models.LOW_LR_ARCHITECTURES backbone
    c.seed = 0
    c.adapt_bn = True
    c.full_finetune = False
    c.eval_batch_size = 500
    return c

"""ImageNet-1k: the common ImageNet KD recipe (ResNet-34 -> ResNet-18, ResNet-50 -> MobileNet) with the paper's
analyzer and granularity terms.

    python train.py --config=configs/imagenet.py:resnet34,resnet18,kd,mas --config.data.dir=/data/imagenet \\
        --workdir=runs/imagenet_r34_r18_kd_mas

Argument: ``teacher,student,method,mode`` as ``configs/cifar100.py`` (``resnet34`` means ``resnet34_imagenet``; the
ImageNet zoo: resnet18, resnet34, resnet50, mobilenetv1).  Data: an image folder (``--config.data.dir=FOLDER``
with ``train/`` and ``val/``, one sub-folder per class) or, without ``data.dir``, tfds ``imagenet2012`` built as
ArrayRecord (``--config.data.data_dir``).  Images stream from the files (``mgd_jax/data/streaming.py``):
RandomResizedCrop(224) + flip on the host for training, resize 256 + centre crop 224 for evaluation, only the
normalisation on the device.  Every value can be overridden (``--config.student.batch_size=512
--config.student.optimizer.lr=0.2``: the lr does not follow the batch by itself, scale it as below).

Where the numbers come from:
* epochs 100, lr x0.1 at 30 / 60 / 90, SGD momentum 0.9, weight decay 1e-4: mdistiller's ImageNet configs
  (DKD, Zhao et al. CVPR 2022, ``configs/imagenet/r34_r18/*.yaml``: EPOCHS 100, LR_DECAY_STAGES [30, 60, 90],
  WEIGHT_DECAY 0.0001, MOMENTUM 0.9), which CRD's (Tian et al. ICLR 2020) and ReviewKD's ImageNet tables follow;
* global batch 256, lr 0.1: lr 0.1 per 256 images, scaled linearly with the batch (Goyal et al. 2017, "Accurate,
  Large Minibatch SGD"; PyTorch's ImageNet example; mdistiller: batch 512, lr 0.2 is the same rule);
* KD: temperature 1, CE 0.5 + KD 0.5 (mdistiller ``KD: TEMPERATURE: 1, CE_WEIGHT: 0.5, KD_WEIGHT: 0.5``); other
  methods keep their own beta (``mgd_jax/methods/<name>.py``) with CE 1 and logit KD 1 at T = 1;
* teacher stage (when the teacher is trained here rather than imported from torchvision, README "torchvision
  teachers"): PyTorch's ImageNet example, 90 epochs, lr 0.1 at batch 256, x0.1 at 30 / 60, weight decay 1e-4;
* analyzer (our choice; the paper has no ImageNet experiment): 10 epochs over the frozen teacher, lr 0.01 per 64
  images as the paper's analyzer (0.04 at 256), x0.1 at 5 / 8; granularities 512-d at T = 2 and 2048-d at T = 8:
  the paper's 64-d / 256-d on resnet56's 64-d feature are 1x and 4x the teacher's feature, here ResNet-34's 512;
* normalisation: ImageNet's mean / std (torchvision); precision bfloat16 (float32 parameters, BatchNorm
  statistics, tubes and losses; ``mgd_jax/precision.py``) for GPU / TPU: on a CPU use
  ``--config.precision=float32``.
"""
import ml_collections
from ml_collections import config_dict

from configs import default

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's
IMAGENET_STD = (0.229, 0.224, 0.225)
BATCH = 256
LR_PER_256 = 0.1
EPOCHS = 100
MILESTONES = (30, 60, 90)
WEIGHT_DECAY = 1e-4
KD_TEMPERATURE = 1.0
KD_WEIGHTS = dict(ce=0.5, logit_kd=0.5)
GRANULARITIES = ((512, 2.0), (2048, 8.0))


def sgd(lr, milestones):
    opt = default.sgd(lr, milestones)
    opt.weight_decay = WEIGHT_DECAY
    return opt


def imagenet_arch(name: str) -> str:
    return name if name.endswith("_imagenet") else f"{name}_imagenet"


def student_run(method: str, mode: str, student_arch: str):
    run = default.student_run(method, mode, temperature=KD_TEMPERATURE, student_arch=student_arch)
    if method == "kd":
        run.weights.ce, run.weights.logit_kd = KD_WEIGHTS["ce"], KD_WEIGHTS["logit_kd"]
    elif run.weights.logit_kd:  # 'mg' protocol: CE 1 + KD 1 + beta * L_method
        run.weights.ce, run.weights.logit_kd = 1.0, 1.0
    if "init" in run:
        run.init.optimizer.weight_decay = WEIGHT_DECAY
    return run


def get_config(arg: str = "resnet34,resnet18,kd,mas"):
    c = default.get_config()
    # dir: an image folder (train/, val/); without it tfds imagenet2012 (data_dir).  workers: decoding threads per
    # process (None: one per core); prefetch: batches decoded ahead; skip_unreadable: a black image (counted,
    # named) instead of an error for a file that cannot be decoded.  crop_scale: RandomResizedCrop's area range;
    # eval_resize_ratio: the short side before the centre crop, over image_size (256 / 224).
    c.data = dict(name="imagenet2012", dir=config_dict.placeholder(str), data_dir=config_dict.placeholder(str),
                  image_size=224, flip=True, crop_scale=(0.08, 1.0), eval_resize_ratio=256 / 224,
                  workers=config_dict.placeholder(int), prefetch=4, skip_unreadable=False, loader="threads",
                  processes=0,
                  num_classes=config_dict.placeholder(int),
                  train_limit=config_dict.placeholder(int), test_limit=config_dict.placeholder(int), on_device=False)
    # the crop and the flip run on the host (streaming.py); the device only normalises
    c.augment = dict(pad=0, flip=False, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    c.drop_remainder = True  # a full global batch every step (the last partial batch of 1.28 M images dropped)
    c.eval_batch_size = 500
    c.precision = "bfloat16"
    c.checkpoint = dict(every_steps=1000, keep=2)
    c.granularities = GRANULARITIES
    c.teacher = dict(arch="resnet34_imagenet", epochs=90, batch_size=BATCH,
                     optimizer=sgd(LR_PER_256 * BATCH / 256, (30, 60)))
    c.analyzer = dict(epochs=10, batch_size=BATCH, shared_pass=False, optimizer=sgd(0.01 * BATCH / 64, (5, 8)))
    c.student = dict(arch="resnet18_imagenet", epochs=EPOCHS, batch_size=BATCH,
                     optimizer=sgd(LR_PER_256 * BATCH / 256, MILESTONES), group_size=8)
    parts = arg.split(",")
    if len(parts) != 4:
        raise ValueError(f"config argument must be 'teacher,student,method,mode', got {arg!r}")
    teacher, student, method, mode = parts
    c.teacher.arch, c.student.arch = imagenet_arch(teacher), imagenet_arch(student)
    if method not in default.known_methods():
        raise ValueError(f"unknown method {method!r}; configs know: {', '.join(default.known_methods())}")
    if mode != "all" and mode not in default.STUDENT_MODES:
        raise ValueError(f"unknown student mode {mode!r}; known: {', '.join(default.STUDENT_MODES)}, all (none, mag "
                         "and mas)")
    modes = ("none", "mag", "mas") if mode == "all" else (mode,)
    c.students = ml_collections.ConfigDict({f"{method}_{m}": student_run(method, m, c.student.arch) for m in modes})
    return c

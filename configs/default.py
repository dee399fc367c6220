"""The paper's setup (SPEC §2, §3.3, §5, §9): CIFAR-100, batch 64, SGD 0.9 / 5e-4, per-epoch multi-step LR.

Every number of the paper lives here once; other configs import and override.
"""
import ml_collections
from ml_collections import config_dict

# Granularities of the self-analyzing module: (encoding dim, temperature).  Paper: 64-d at T=2, 256-d at T=8.
PAPER_GRANULARITIES = ((64, 2.0), (256, 8.0))

# Students whose backbone the reference trains with lr 0.01 instead of 0.05.
LOW_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")

# Teacher -> student pairs of the README table (the paper's CIFAR-100 table, SPEC §8).
README_PAIRS = (("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"), ("resnet110", "resnet20"),
                ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"))
# The 13 pairs of the authors' scripts (scripts/cifar100_*.sh).
SCRIPT_PAIRS = README_PAIRS + (("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2"), ("ResNet50", "vgg8"),
                               ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"), ("wrn_40_2", "ShuffleV1"))

# Loss weights (ce_weight, div_weight = logit KD at T=4, kd_weight = L_method) of the authors' scripts
# (scripts/cifar100_*.sh: kd, hint, attention, similarity, vid, crd).  The granularity terms always have weight 1.
# 'none' = a student without teacher.  Methods without a script (SPEC_BASELINES §1) keep the scripts' ce 1 /
# logit KD 1 and take RepDistiller's beta as the method weight (correlation 0.02, rkd 1, pkt 30000, nst 50,
# abound 1, factor 200, fsp 50); kdsvd has no published beta: 1.  afd: AberHu's zoo uses lambda = 500 on the
# *mean* of 3 layer losses; ours sum the layers, so 500 / 3.  abound and fsp only act through their init stage.
METHOD_WEIGHTS = {
    "none": dict(ce=1.0, logit_kd=0.0, method=0.0),
    "kd": dict(ce=0.2, logit_kd=0.8, method=1.0),
    "hint": dict(ce=1.0, logit_kd=1.0, method=100.0),
    "attention": dict(ce=1.0, logit_kd=1.0, method=1000.0),
    "similarity": dict(ce=1.0, logit_kd=1.0, method=3000.0),
    "vid": dict(ce=1.0, logit_kd=1.0, method=1.0),
    "crd": dict(ce=1.0, logit_kd=1.0, method=0.8),
    "rkd": dict(ce=1.0, logit_kd=1.0, method=1.0),
    "afd": dict(ce=1.0, logit_kd=1.0, method=500.0 / 3.0),
    "correlation": dict(ce=1.0, logit_kd=1.0, method=0.02),
    "pkt": dict(ce=1.0, logit_kd=1.0, method=30000.0),
    "nst": dict(ce=1.0, logit_kd=1.0, method=50.0),
    "kdsvd": dict(ce=1.0, logit_kd=1.0, method=1.0),
    "abound": dict(ce=1.0, logit_kd=1.0, method=1.0),
    "factor": dict(ce=1.0, logit_kd=1.0, method=200.0),
    "fsp": dict(ce=1.0, logit_kd=1.0, method=50.0),
}
# Methods with an init stage (pretrain.py; RepDistiller: 30 epochs, constant lr 0.05; factor with a CIFAR
# ResNet / WRN student: 0.01).
INIT_STAGE_METHODS = ("abound", "factor", "fsp")
INIT_EPOCHS = 30
# CRD: feature dim 128, 16384 negatives, T 0.07, momentum 0.5, 'exact' positives.
CRD_OPTIONS = dict(feat_dim=128, nce_k=16384, nce_t=0.07, nce_m=0.5, mode="exact")

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)  # data/cifar100.py (the teacher script's 0.4866/0.4409 differ by 1e-4)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


def sgd(lr, milestones):
    return ml_collections.ConfigDict(dict(lr=lr, momentum=0.9, weight_decay=5e-4, milestones=tuple(milestones),
                                          gamma=0.1))


def student_run(method: str, granularity: str, temperature: float = 4.0, student_arch: str = ""):
    """One student of the table: method x granularity mode with the scripts' weights."""
    w = METHOD_WEIGHTS[method]
    run = dict(method=method, granularity=granularity, temperature=temperature,
               weights=dict(ce=w["ce"], logit_kd=w["logit_kd"], method=w["method"], granularity=1.0),
               method_options=CRD_OPTIONS if method == "crd" else {})
    if method in INIT_STAGE_METHODS:
        low = method == "factor" and student_arch.startswith(("resnet", "wrn"))
        run["init"] = dict(epochs=INIT_EPOCHS, optimizer=sgd(0.01 if low else 0.05, ()))
    return ml_collections.ConfigDict(run)


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    # tfds data_dir (None: tfds' default, $TFDS_DATA_DIR or ~/tensorflow_datasets); train/test_limit: smoke runs.
    # on_device: training set resident on the devices, rows gathered inside the step (None: on GPU / TPU only).
    c.data = dict(name="cifar100", data_dir=config_dict.placeholder(str), train_limit=config_dict.placeholder(int),
                  test_limit=config_dict.placeholder(int), on_device=config_dict.placeholder(bool))
    # SPEC §5: zero-pad 4 in pixel space, random 32x32 crop, horizontal flip, normalise.
    c.augment = dict(pad=4, flip=True, mean=CIFAR100_MEAN, std=CIFAR100_STD)
    c.drop_remainder = False  # the reference keeps the last, smaller batch (782 steps / epoch)
    c.eval_batch_size = 500
    c.granularities = PAPER_GRANULARITIES
    c.progress = True
    c.compilation_cache = True  # persistent XLA compilation cache in <workdir>/.jax_cache (train.py)
    # CPU only: None = one XLA device per core, the batch split over them (mgd_jax/train/cpu.py); a count; or 0
    # for XLA's single CPU device.  Ignored when XLA_FLAGS sets a device count.
    c.cpu_devices = config_dict.placeholder(int)
    # Compute dtype of the backbones: float32 (the paper's) or bfloat16 (mixed precision for GPU / TPU:
    # float32 parameters, BatchNorm statistics, tubes and losses; mgd_jax/precision.py).
    c.precision = "float32"
    # latest checkpoint also every N optimizer steps inside an epoch (a kill redoes at most N steps); keep K.
    c.checkpoint = dict(every_steps=500, keep=2)
    # Multi-host (README "Preemption and multi-host"); unset values come from JAX_* environment variables.
    c.distributed = dict(coordinator_address=config_dict.placeholder(str), num_processes=config_dict.placeholder(int),
                         process_id=config_dict.placeholder(int), timeout_seconds=300)
    # Stage 1 (teacher.py): 240 epochs, lr 0.05, x0.1 at 60/120/180.
    c.teacher = dict(arch="resnet56", epochs=240, batch_size=64, optimizer=sgd(0.05, (60, 120, 180)))
    # Stage 2 (train_teacher_wrapper.py): 60 epochs, lr 0.01 per granularity, x0.1 at 30/45.
    c.analyzer = dict(epochs=60, batch_size=64, shared_pass=False, optimizer=sgd(0.01, (30, 45)))
    # Stage 3 (student.py / student_stable.py): 240 epochs, lr 0.05, x0.1 at 150/180/210.
    c.student = dict(arch="resnet20", epochs=240, batch_size=64, optimizer=sgd(0.05, (150, 180, 210)))
    c.students = {"kd_mas": student_run("kd", "mas")}
    return c

"""The paper's setup (SPEC §2, §3.3, §5, §9): CIFAR-100, batch 64, SGD 0.9 / 5e-4, per-epoch multi-step LR.

Every number of the paper lives here once; other configs import and override.
"""
import ml_collections
from ml_collections import config_dict

# Granularities of the self-analyzing module: (encoding dim, temperature).  Paper: 64-d at T=2, 256-d at T=8.
from mgd_jax.analyzer import PAPER_GRANULARITIES
# Students whose backbone the reference trains with 0.01 instead of 0.05 (student.py).
from mgd_jax.models import LOW_LR_ARCHITECTURES as LOW_LR_STUDENTS

STUDENT_LR = 0.05
LOW_LR = 0.01

# Teacher -> student pairs of the README table (the paper's CIFAR-100 table, SPEC §8).
README_PAIRS = (("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"), ("resnet110", "resnet20"),
                ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"))
# The 13 pairs of the authors' scripts (scripts/cifar100_*.sh).
SCRIPT_PAIRS = README_PAIRS + (("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2"), ("ResNet50", "vgg8"),
                               ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"), ("wrn_40_2", "ShuffleV1"))

# Method weights (beta) of RepDistiller (its scripts / README: "-a 0 -b beta", i.e. with logit KD weight 0;
# SPEC_BASELINES §1).  The authors' MG scripts (scripts/cifar100_*.sh: hint, attention, similarity, vid, crd) use
# the same kd_weight.  AB and FSP have no main-stage term (they act through their init stage): their beta is moot.
REPDISTILLER_BETA = {"hint": 100.0, "attention": 1000.0, "similarity": 3000.0, "vid": 1.0, "crd": 0.8, "rkd": 1.0,
                     "correlation": 0.02, "pkt": 30000.0, "nst": 50.0, "abound": 1.0, "factor": 200.0, "fsp": 50.0}
# Methods outside RepDistiller, our choices: kdsvd has no published beta: 1.  afd: AberHu's zoo uses lambda = 500
# on the *mean* of 3 layer losses; ours sum the layers, so 500 / 3.
OWN_BETA = {"afd": 500.0 / 3.0, "kdsvd": 1.0}
NO_TEACHER = dict(ce=1.0, logit_kd=0.0, method=0.0)  # 'none' = a student without teacher
# Loss weights (ce_weight, div_weight = logit KD at T=4, kd_weight = L_method) of the authors' MG scripts
# (cifar100_kd.sh: CE 0.2, KD 0.8; the other scripts: CE 1, KD 1, method beta).  Methods without a script keep
# the scripts' CE 1 / KD 1 with the beta above.  The granularity terms always have weight 1.
METHOD_WEIGHTS = {
    "none": NO_TEACHER,
    "kd": dict(ce=0.2, logit_kd=0.8, method=1.0),
    **{m: dict(ce=1.0, logit_kd=1.0, method=b) for m, b in {**REPDISTILLER_BETA, **OWN_BETA}.items()},
}
# The paper's baseline protocol: its baseline numbers are RepDistiller runs of the method alone (RepDistiller's
# scripts / README): KD "-r 0.1 -a 0.9 -b 0" (CE 0.1, logit KD 0.9); every other method "-a 0 -b beta" (CE 1,
# logit KD 0, method beta).  kdsvd / afd (not in RepDistiller) take our beta.
REPDISTILLER_WEIGHTS = {
    "none": NO_TEACHER,
    "kd": dict(ce=0.1, logit_kd=0.9, method=0.0),
    **{m: dict(ce=1.0, logit_kd=0.0, method=b) for m, b in {**REPDISTILLER_BETA, **OWN_BETA}.items()},
}
# Student modes (config / sweep tokens) -> (granularity mode of the objective, weight protocol):
# 'baseline' = the paper's baselines (RepDistiller's weights, no granularity terms); 'none' = the MG scripts'
# weights without the granularity terms (the ablation that isolates them); 'mag' / 'mas' = the paper's method.
STUDENT_MODES = {"baseline": ("none", "repdistiller"), "none": ("none", "mg"), "mag": ("mag", "mg"),
                 "mas": ("mas", "mg")}
PROTOCOL_WEIGHTS = {"repdistiller": REPDISTILLER_WEIGHTS, "mg": METHOD_WEIGHTS}
# Methods with an init stage (RepDistiller's pretrain.py: 30 epochs, constant lr = the student's lr; factor with
# a CIFAR ResNet / WRN student: 0.01).
INIT_STAGE_METHODS = ("abound", "factor", "fsp")
INIT_EPOCHS = 30
FACTOR_INIT_LR = 0.01
# Teacher lr schedules (x0.1 at these epochs of 240).  'mg': the authors' teacher.py (the default).
# 'repdistiller': RepDistiller's train_teacher.py, whose teachers give the teacher accuracies of the paper's table
# (SPEC Q14; the same milestones as the student stage).
STUDENT_MILESTONES = (150, 180, 210)
TEACHER_SCHEDULES = {"mg": (60, 120, 180), "repdistiller": STUDENT_MILESTONES}
# CRD: feature dim 128, 16384 negatives, T 0.07, momentum 0.5, 'exact' positives.
CRD_OPTIONS = dict(feat_dim=128, nce_k=16384, nce_t=0.07, nce_m=0.5, mode="exact")

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)  # data/cifar100.py (the teacher script's 0.4866/0.4409 differ by 1e-4)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


def sgd(lr, milestones):
    return ml_collections.ConfigDict(dict(lr=lr, momentum=0.9, weight_decay=5e-4, milestones=tuple(milestones),
                                          gamma=0.1))


def student_lr(arch: str) -> float:
    return LOW_LR if arch in LOW_LR_STUDENTS else STUDENT_LR


def init_lr(method: str, student_arch: str) -> float:
    """pretrain.py: the student's lr; factor with a CIFAR ResNet / WRN student 0.01."""
    if method == "factor" and student_arch.startswith(("resnet", "wrn")):
        return FACTOR_INIT_LR
    return student_lr(student_arch)


def student_run(method: str, mode: str, temperature: float = 4.0, student_arch: str = ""):
    """One student of the table: method x mode (``STUDENT_MODES``: baseline | none | mag | mas).  A method with
    an init stage needs ``student_arch`` (its lr is the student's)."""
    if mode not in STUDENT_MODES:
        raise ValueError(f"unknown student mode {mode!r}; known: {', '.join(STUDENT_MODES)}")
    granularity, protocol = STUDENT_MODES[mode]
    w = PROTOCOL_WEIGHTS[protocol][method]
    run = dict(method=method, granularity=granularity, protocol=protocol, temperature=temperature,
               weights=dict(ce=w["ce"], logit_kd=w["logit_kd"], method=w["method"], granularity=1.0),
               method_options=CRD_OPTIONS if method == "crd" else {})
    if method in INIT_STAGE_METHODS:
        if not student_arch:
            raise ValueError(f"student_run({method!r}): the init stage's lr depends on the student; pass student_arch")
        run["init"] = dict(epochs=INIT_EPOCHS, optimizer=sgd(init_lr(method, student_arch), ()))
    return ml_collections.ConfigDict(run)


def set_pair(c, teacher: str, student: str):
    """Teacher / student architectures, the student's lr by ``student_lr``."""
    c.teacher.arch, c.student.arch = teacher, student
    c.student.optimizer.lr = student_lr(student)


def set_teacher_schedule(c, name: str):
    """The teacher's milestones by name (``TEACHER_SCHEDULES``)."""
    if name not in TEACHER_SCHEDULES:
        raise ValueError(f"unknown teacher schedule {name!r}; known: {', '.join(TEACHER_SCHEDULES)}")
    c.teacher.optimizer.milestones = TEACHER_SCHEDULES[name]


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
    # Stage 1 (teacher.py): 240 epochs, lr 0.05, x0.1 at 60/120/180 (TEACHER_SCHEDULES: 'repdistiller' for
    # 150/180/210, see configs/cifar100.py).
    c.teacher = dict(arch="resnet56", epochs=240, batch_size=64, optimizer=sgd(0.05, TEACHER_SCHEDULES["mg"]))
    # Stage 2 (train_teacher_wrapper.py): 60 epochs, lr 0.01 per granularity, x0.1 at 30/45.
    c.analyzer = dict(epochs=60, batch_size=64, shared_pass=False, optimizer=sgd(0.01, (30, 45)))
    # Stage 3 (student.py / student_stable.py): 240 epochs, lr 0.05, x0.1 at 150/180/210.
    c.student = dict(arch="resnet20", epochs=240, batch_size=64, optimizer=sgd(STUDENT_LR, STUDENT_MILESTONES))
    c.students = {"kd_mas": student_run("kd", "mas")}
    return c

"""The paper's setup (SPEC §2, §3.3, §5, §9): CIFAR-100, batch 64, SGD 0.9 / 5e-4, per-epoch multi-step LR.

Every number of the paper lives here once (a baseline method's own numbers, its loss weight, options and init
stage, in its file under mgd_jax/methods/); other configs import and override.
"""
import copy

import ml_collections
from ml_collections import config_dict

# Granularities of the self-analyzing module: (encoding dim, temperature).  Paper: 64-d at T=2, 256-d at T=8.
from mgd_jax.analyzer import PAPER_GRANULARITIES
from mgd_jax.methods import get_method, known_methods
# Students whose backbone the reference trains with 0.01 instead of 0.05 (student.py).
from mgd_jax.models import LOW_LR_ARCHITECTURES as LOW_LR_STUDENTS
from mgd_jax.stages.common import RUN_SEED

STUDENT_LR = 0.05
LOW_LR = 0.01

# Teacher -> student pairs of the README table (the paper's CIFAR-100 table, SPEC §8).
README_PAIRS = (("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"), ("resnet110", "resnet20"),
                ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"))
# The 13 pairs of the authors' scripts (scripts/cifar100_*.sh).
SCRIPT_PAIRS = README_PAIRS + (("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2"), ("ResNet50", "vgg8"),
                               ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"), ("wrn_40_2", "ShuffleV1"))

# Student modes (config / sweep tokens) -> (granularity mode of the objective, weight protocol):
# 'baseline' = the paper's baselines (RepDistiller's weights, no granularity terms); 'none' = the MG scripts'
# weights without the granularity terms (the ablation that isolates them); 'mag' / 'mas' = the paper's method.
STUDENT_MODES = {"baseline": ("none", "repdistiller"), "none": ("none", "mg"), "mag": ("mag", "mg"),
                 "mas": ("mas", "mg")}
# Loss weights (ce, logit KD at T=4, L_method) come from each method's file (mgd_jax/methods/<name>.py: its beta
# and where it comes from; ``Method.loss_weights``).  Protocol 'mg', the authors' MG scripts (scripts/cifar100_*.sh):
# CE 1, KD 1, the method's beta (RepDistiller's, which the scripts for hint, attention, similarity, vid and crd
# use too); KD: CE 0.2, KD 0.8 (cifar100_kd.sh).  Protocol 'repdistiller', the paper's baseline numbers
# (RepDistiller's scripts / README, "-a 0 -b beta"): CE 1, no logit KD, the same beta; KD "-r 0.1 -a 0.9 -b 0".
# kdsvd / afd (not in RepDistiller) take our beta.  The granularity terms always have weight 1.
# The methods after the paper (dkd, dist, review, ofd) take their authors' recipe under both protocols, from
# their files: the logit methods DKD (CE 1 + DKD, beta per pair) and DIST (CE 1 + 2 DIST) replace the logit-KD
# term; ReviewKD (loss weight per pair) and OFD (1e-3) add logit KD 1 under 'mg' like every feature method.
METHOD_WEIGHTS = {m: get_method(m).loss_weights("mg") for m in known_methods()}
REPDISTILLER_WEIGHTS = {m: get_method(m).loss_weights("repdistiller") for m in known_methods()}
# Methods with an init stage (AB, FT, FSP) take its epochs and lr from the method (RepDistiller's pretrain.py:
# 30 epochs, constant lr = the student's lr; factor with a CIFAR ResNet / WRN student: 0.01).  CRD's options
# (feature dim 128, 16384 negatives, T 0.07, momentum 0.5, 'exact' positives) come from mgd_jax/methods/crd.py.

# Teacher lr schedules (x0.1 at these epochs of 240).  'mg': the authors' teacher.py (the default).
# 'repdistiller': RepDistiller's train_teacher.py, whose teachers give the teacher accuracies of the paper's table
# (SPEC Q14; the same milestones as the student stage).
STUDENT_MILESTONES = (150, 180, 210)
TEACHER_SCHEDULES = {"mg": (60, 120, 180), "repdistiller": STUDENT_MILESTONES}

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)  # data/cifar100.py (the teacher script's 0.4866/0.4409 differ by 1e-4)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


def sgd(lr, milestones):
    return ml_collections.ConfigDict(dict(lr=lr, momentum=0.9, weight_decay=5e-4, milestones=tuple(milestones),
                                          gamma=0.1))


def student_lr(arch: str) -> float:
    return LOW_LR if arch in LOW_LR_STUDENTS else STUDENT_LR


def student_run(method: str, mode: str, temperature: float = 4.0, student_arch: str = "", teacher_arch: str = ""):
    """One student of the table: method x mode (``STUDENT_MODES``: baseline | none | mag | mas), with the method's
    weights under the mode's protocol and its options.  A method with an init stage needs ``student_arch`` (its
    lr is the student's).  With both architectures, the values the method's authors set per pair
    (``Method.pair_options``: DKD's beta; ``Method.pair_beta``: ReviewKD's loss weight)."""
    if mode not in STUDENT_MODES:
        raise ValueError(f"unknown student mode {mode!r}; known: {', '.join(STUDENT_MODES)}")
    granularity, protocol = STUDENT_MODES[mode]
    m = get_method(method)
    pair = (teacher_arch, student_arch) if teacher_arch and student_arch else None
    if pair:
        m = get_method(method, **m.pair_options(*pair))
    w = m.loss_weights(protocol)
    if pair and w["method"] and m.pair_beta(*pair) is not None:
        w = {**w, "method": m.pair_beta(*pair)}
    run = dict(method=method, granularity=granularity, protocol=protocol, temperature=temperature,
               weights=dict(ce=w["ce"], logit_kd=w["logit_kd"], method=w["method"], granularity=1.0),
               method_options=m.options(),
               # this student's own seed (its initialisation, data order and augmentation; -1: the run's seed).
               # Students of one method differing only in seed still train as one vmapped program in a fused group.
               seed=RUN_SEED)
    if m.has_init_stage:
        if not student_arch:
            raise ValueError(f"student_run({method!r}): the init stage's lr depends on the student; pass student_arch")
        run["init"] = dict(epochs=m.init_epochs, optimizer=sgd(m.init_lr(student_arch, student_lr(student_arch)), ()))
    return ml_collections.ConfigDict(run)


def set_pair(c, teacher: str, student: str):
    """Teacher / student architectures, the student's lr by ``student_lr``."""
    c.teacher.arch, c.student.arch = teacher, student
    c.student.optimizer.lr = student_lr(student)


def set_students(c, method: str, mode: str):
    """``config.students`` for ``method`` in ``mode`` (``all``: none, mag and mas, sharing one teacher)."""
    if method not in known_methods():
        raise ValueError(f"unknown method {method!r}; configs know: {', '.join(known_methods())}")
    if mode != "all" and mode not in STUDENT_MODES:
        raise ValueError(f"unknown student mode {mode!r}; known: {', '.join(STUDENT_MODES)}, all (none, mag and mas)")
    modes = ("none", "mag", "mas") if mode == "all" else (mode,)
    c.students = ml_collections.ConfigDict({f"{method}_{m}": student_run(method, m, student_arch=c.student.arch,
                                                                         teacher_arch=c.teacher.arch)
                                            for m in modes})


def seeded_students(c, seeds):
    """Every student of ``c.students`` once per seed of ``seeds``, named ``<name>_seed<k>`` with ``seed`` k (its
    own initialisation, data order and augmentation; the teacher and analyzer keep the run's ``seed``).  Fused, the
    seeds and modes of one method train as one vmapped program where ``student.vmap`` is on."""
    seeds = tuple(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(k, int) and k >= 0 for k in seeds):
        raise ValueError(f"seeded_students: seeds must be distinct integers >= 0, got {seeds!r}")
    students = {}
    for name, run in c.students.items():
        for k in seeds:
            students[f"{name}_seed{k}"] = copy.deepcopy(run)
            students[f"{name}_seed{k}"].seed = k
    c.students = ml_collections.ConfigDict(students)
    return c


def apply_run_argument(c, arg: str, schedule: bool = True):
    """A config file's argument ``teacher,student,method,mode[,teacher_schedule]`` (what ``train.py
    --config=FILE:ARG`` and the sweep pass) applied to ``c``; ``schedule=False``: the file keeps its own teacher
    schedule and refuses a fifth field."""
    parts = arg.split(",")
    if len(parts) not in ((4, 5) if schedule else (4,)):
        form = "teacher,student,method,mode" + ("[,teacher_schedule]" if schedule else "")
        raise ValueError(f"config argument must be '{form}', got {arg!r}")
    teacher, student, method, mode = parts[:4]
    set_pair(c, teacher, student)
    if schedule:
        set_teacher_schedule(c, parts[4] if len(parts) == 5 else "mg")
    set_students(c, method, mode)
    return c


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
    # persistent XLA compilation cache in <workdir>/.jax_cache, or $JAX_COMPILATION_CACHE_DIR when set (train.py);
    # off for several CPU processes
    c.compilation_cache = True
    # CPU only: None = one XLA device per core, the batch split over them (mgd_jax/train/cpu.py); a count; or 0
    # for XLA's single CPU device.  Ignored when XLA_FLAGS sets a device count.
    c.cpu_devices = config_dict.placeholder(int)
    # Compute dtype of the backbones: float32 (the paper's) or bfloat16 (mixed precision for GPU / TPU:
    # float32 parameters, BatchNorm statistics, tubes and losses; mgd_jax/precision.py).
    c.precision = "float32"
    # latest checkpoint also every N optimizer steps inside an epoch (a kill redoes at most N steps); keep K.
    c.checkpoint = dict(every_steps=500, keep=2)
    # Multi-host (README "Preemption and multi-host"); unset values come from JAX_* environment variables.  A process
    # silent for heartbeat_timeout_seconds counts as lost: the others stop in one line, exit 75 (train/supervisor.py).
    c.distributed = dict(coordinator_address=config_dict.placeholder(str), num_processes=config_dict.placeholder(int),
                         process_id=config_dict.placeholder(int), timeout_seconds=300, heartbeat_timeout_seconds=60)
    # Stage 1 (teacher.py): 240 epochs, lr 0.05, x0.1 at 60/120/180 (TEACHER_SCHEDULES: 'repdistiller' for
    # 150/180/210, see configs/cifar100.py).
    c.teacher = dict(arch="resnet56", epochs=240, batch_size=64, optimizer=sgd(0.05, TEACHER_SCHEDULES["mg"]))
    # Stage 2 (train_teacher_wrapper.py): 60 epochs, lr 0.01 per granularity, x0.1 at 30/45.
    c.analyzer = dict(epochs=60, batch_size=64, shared_pass=False, optimizer=sgd(0.01, (30, 45)))
    # Stage 3 (student.py / student_stable.py): 240 epochs, lr 0.05, x0.1 at 150/180/210.
    # group_size: the students of a run train fused, this many per group, sharing one teacher pass per batch (0: all
    # of them in one group; 1: one after another); each student's result is the same up to float32 noise.
    # vmap: the students of one method in a group run as one vmapped program, each convolution one batched kernel
    # ('on' / 'off'; 'auto': what measured faster on the backend, docs/speed.md "Fused students").
    # logit_standardization: z-score the logits of every logit-level KL of the objective (the KD / stable-excitation
    # term, DKD), Sun et al., CVPR 2024; off in the paper.  Their CIFAR KD recipe with it: T 2, CE 0.1, KD 9.
    c.student = dict(arch="resnet20", epochs=240, batch_size=64, optimizer=sgd(STUDENT_LR, STUDENT_MILESTONES),
                     group_size=8, vmap="auto", logit_standardization=False)
    c.students = {"kd_mas": student_run("kd", "mas")}
    return c

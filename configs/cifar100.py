"""CIFAR-100 experiments of the paper.

    python train.py --config=configs/cifar100.py:resnet56,resnet20,kd,mas --workdir=runs/r56_r20_kd_mas

Argument: ``teacher,student,method,mode[,teacher_schedule]``.  mode: ``baseline`` (the paper's baseline
protocol: RepDistiller's weights, CE + method without logit KD; KD: CE 0.1 + KD 0.9), ``none`` (the authors' MG
scripts' weights without the granularity terms: the ablation that isolates them), ``mag``, ``mas``; ``all`` runs
none, mag and mas as three students sharing one teacher and analyzer.  teacher_schedule: ``mg`` (default, the
authors' teacher.py: x0.1 at 60/120/180) or ``repdistiller`` (150/180/210, RepDistiller's teachers, whose
accuracies the paper's table quotes).  Any two architectures of the zoo form a pair; the paper's are
``default.README_PAIRS`` (its table) and ``default.SCRIPT_PAIRS`` (the authors' 13 scripts), e.g.
``wrn_40_2,wrn_16_2`` ... ``vgg13,vgg8``, ``resnet32x4,ShuffleV1``.  MobileNetV2 / ShuffleV1 / ShuffleV2 students
train with lr 0.01 (the reference's rule).
"""
import ml_collections

from configs import default
from mgd_jax.methods import known_methods


def get_config(arg: str = "resnet56,resnet20,kd,mas"):
    parts = arg.split(",")
    if len(parts) not in (4, 5):
        raise ValueError(f"config argument must be 'teacher,student,method,mode[,teacher_schedule]', got {arg!r}")
    teacher, student, method, mode = parts[:4]
    c = default.get_config()
    default.set_pair(c, teacher, student)
    default.set_teacher_schedule(c, parts[4] if len(parts) == 5 else "mg")
    if method not in known_methods():
        raise ValueError(f"unknown method {method!r}; configs know: {', '.join(known_methods())}")
    modes = ("none", "mag", "mas") if mode == "all" else (mode,)
    c.students = ml_collections.ConfigDict({f"{method}_{m}": default.student_run(method, m, student_arch=student)
                                            for m in modes})
    return c

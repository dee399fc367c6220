"""CIFAR-100 experiments of the paper.

    python train.py --config=configs/cifar100.py:resnet56,resnet20,kd,mas --workdir=runs/r56_r20_kd_mas

Argument: ``teacher,student,method,granularity`` (granularity one of none | mag | mas; ``all`` runs the three
modes as three students sharing one teacher and analyzer).  Any two architectures of the zoo form a pair; the
paper's are ``default.README_PAIRS`` (its table) and ``default.SCRIPT_PAIRS`` (the authors' 13 scripts), e.g.
``wrn_40_2,wrn_16_2`` ... ``vgg13,vgg8``, ``resnet32x4,ShuffleV1``.  MobileNetV2 / ShuffleV1 / ShuffleV2 students
train with lr 0.01 (the reference's rule).
"""
import ml_collections

from configs import default


def get_config(arg: str = "resnet56,resnet20,kd,mas"):
    parts = arg.split(",")
    if len(parts) != 4:
        raise ValueError(f"config argument must be 'teacher,student,method,granularity', got {arg!r}")
    teacher, student, method, granularity = parts
    c = default.get_config()
    c.teacher.arch = teacher
    c.student.arch = student
    if student in default.LOW_LR_STUDENTS:
        c.student.optimizer.lr = 0.01
    if method not in default.METHOD_WEIGHTS:
        raise ValueError(f"unknown method {method!r}; configs know: {', '.join(default.METHOD_WEIGHTS)}")
    modes = ("none", "mag", "mas") if granularity == "all" else (granularity,)
    c.students = ml_collections.ConfigDict({f"{method}_{m}": default.student_run(method, m, student_arch=student)
                                            for m in modes})
    return c

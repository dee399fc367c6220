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
from configs import default


def get_config(arg: str = "resnet56,resnet20,kd,mas"):
    return default.apply_run_argument(default.get_config(), arg)

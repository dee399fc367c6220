"""The offline quickstart (``python train.py``): all three stages on scikit-learn's bundled digits.

Data: 1797 8x8 digits, stratified split 1437 train / 360 test (seed 0), upsampled x2 to 16x16, one channel;
augmentation: zero-pad 2 + random 16x16 crop, no flip (digits are not mirror-symmetric).
Models: resnet20 teacher -> resnet8 student (the CIFAR ResNets, global average pooling).
Students: no distillation, KD, MAG+KD, MAS+KD.  Schedules are the paper's, scaled down in epochs.
"""
import ml_collections

from configs import default

# mean / std of the 1437 training images scaled to [0, 1] (of data.split='sklearn'; 'stratified': 0.3056 / 0.3760)
DIGITS_MEAN = (0.3054,)
DIGITS_STD = (0.3760,)


def get_config(arg: str | None = None):
    """``arg``: optional ``teacher,student,method,mode`` (as configs/cifar100.py; the sweep passes it)."""
    c = default.get_config()
    c.data.name = "digits"
    c.data.image_size = 16
    c.data.test_size = 360
    c.data.split_seed = 0
    c.data.split = "stratified"
    c.augment = dict(pad=2, flip=False, mean=DIGITS_MEAN, std=DIGITS_STD)
    c.teacher.arch = "resnet20"
    c.teacher.epochs = 12
    c.teacher.optimizer.milestones = (6, 9)
    c.analyzer.epochs = 6
    c.analyzer.optimizer.milestones = (3, 5)
    c.student.arch = "resnet8"
    c.student.epochs = 12
    c.student.optimizer.milestones = (6, 9)
    c.students = ml_collections.ConfigDict({
        "ce": default.student_run("none", "none"),
        "kd": default.student_run("kd", "none"),
        "mag_kd": default.student_run("kd", "mag"),
        "mas_kd": default.student_run("kd", "mas"),
    })
    return default.apply_run_argument(c, arg, schedule=False) if arg else c

"""A seconds-long smoke run of all three stages (tests, CI, trying a change): digits at 8x8, 192 training
images, resnet8 teacher and student, 2 epochs per stage, one MAS+KD student, checkpoints every 2 steps."""
import ml_collections

from configs import default, quickstart


def get_config(arg: str | None = None):
    """``arg``: optional ``teacher,student,method,mode`` (as configs/cifar100.py; the sweep passes it)."""
    c = quickstart.get_config()
    c.data.image_size = 8
    c.data.train_limit = 192
    c.data.test_limit = 100
    c.progress = False
    c.teacher.arch = "resnet8"
    c.student.arch = "resnet8"
    for stage in (c.teacher, c.analyzer, c.student):
        stage.epochs = 2
        stage.optimizer.milestones = (1,)
    c.granularities = ((16, 2.0), (32, 8.0))
    c.checkpoint.every_steps = 2
    c.students = ml_collections.ConfigDict({"mas_kd": default.student_run("kd", "mas")})
    return default.apply_run_argument(c, arg, schedule=False) if arg else c

"""The paper's CIFAR-100 top-1 (%) table (the authors' README; SPEC §8), copied exactly.

Keys: (method, granularity mode) -> {"teacher,student": top-1}; TEACHER_STUDENT: the pairs' own accuracies.
Mode 'none' is the paper's baseline column: runs of the RepDistiller protocol (CE + method, no logit KD), which
our mode 'baseline' reproduces (not our 'none', the MG-weights ablation; mgd_jax/sweep.py ``paper_number``).
"""

TEACHER_STUDENT = {
    "wrn_40_2,wrn_16_2": (75.61, 73.26),
    "wrn_40_2,wrn_40_1": (75.61, 71.98),
    "resnet56,resnet20": (72.34, 69.06),
    "resnet110,resnet20": (74.31, 69.06),
    "resnet110,resnet32": (74.31, 71.14),
    "resnet32x4,resnet8x4": (79.42, 72.5),
    "vgg13,vgg8": (74.64, 70.36),
}

TOP1 = {
    ('kd', 'none'): {"wrn_40_2,wrn_16_2": 73.59, "wrn_40_2,wrn_40_1": 73.58, "resnet56,resnet20": 71.05, "resnet110,resnet20": 70.9, "resnet110,resnet32": 73.34, "resnet32x4,resnet8x4": 73.27, "vgg13,vgg8": 73.18},
    ('kd', 'mag'): {"wrn_40_2,wrn_16_2": 75.09, "wrn_40_2,wrn_40_1": 74.1, "resnet56,resnet20": 71.43, "resnet110,resnet20": 71.53, "resnet110,resnet32": 73.55, "resnet32x4,resnet8x4": 73.82, "vgg13,vgg8": 73.63},
    ('kd', 'mas'): {"wrn_40_2,wrn_16_2": 75.35, "wrn_40_2,wrn_40_1": 74.42, "resnet56,resnet20": 71.08, "resnet110,resnet20": 71.03, "resnet110,resnet32": 73.54, "resnet32x4,resnet8x4": 74.2, "vgg13,vgg8": 74.18},
    ('hint', 'none'): {"wrn_40_2,wrn_16_2": 73.82, "wrn_40_2,wrn_40_1": 72.32, "resnet56,resnet20": 69.33, "resnet110,resnet20": 68.96, "resnet110,resnet32": 71.07, "resnet32x4,resnet8x4": 73.62, "vgg13,vgg8": 71.14},
    ('hint', 'mag'): {"wrn_40_2,wrn_16_2": 75.3, "wrn_40_2,wrn_40_1": 73.99, "resnet56,resnet20": 70.29, "resnet110,resnet20": 70.31, "resnet110,resnet32": 72.73, "resnet32x4,resnet8x4": 74.88, "vgg13,vgg8": 73.06},
    ('hint', 'mas'): {"wrn_40_2,wrn_16_2": 75.17, "wrn_40_2,wrn_40_1": 74.43, "resnet56,resnet20": 71.08, "resnet110,resnet20": 70.69, "resnet110,resnet32": 73.18, "resnet32x4,resnet8x4": 75.76, "vgg13,vgg8": 73.59},
    ('attention', 'none'): {"wrn_40_2,wrn_16_2": 74.39, "wrn_40_2,wrn_40_1": 72.82, "resnet56,resnet20": 70.39, "resnet110,resnet20": 70.36, "resnet110,resnet32": 72.6, "resnet32x4,resnet8x4": 73.53, "vgg13,vgg8": 71.41},
    ('attention', 'mag'): {"wrn_40_2,wrn_16_2": 75.28, "wrn_40_2,wrn_40_1": 73.81, "resnet56,resnet20": 70.99, "resnet110,resnet20": 70.57, "resnet110,resnet32": 73.56, "resnet32x4,resnet8x4": 74.56, "vgg13,vgg8": 72.11},
    ('attention', 'mas'): {"wrn_40_2,wrn_16_2": 75.98, "wrn_40_2,wrn_40_1": 74.9, "resnet56,resnet20": 71.78, "resnet110,resnet20": 71.34, "resnet110,resnet32": 73.29, "resnet32x4,resnet8x4": 74.92, "vgg13,vgg8": 73.38},
    ('similarity', 'none'): {"wrn_40_2,wrn_16_2": 74.01, "wrn_40_2,wrn_40_1": 73.0, "resnet56,resnet20": 70.28, "resnet110,resnet20": 70.29, "resnet110,resnet32": 72.74, "resnet32x4,resnet8x4": 73.28, "vgg13,vgg8": 72.94},
    ('similarity', 'mag'): {"wrn_40_2,wrn_16_2": 74.3, "wrn_40_2,wrn_40_1": 73.71, "resnet56,resnet20": 71.13, "resnet110,resnet20": 70.79, "resnet110,resnet32": 73.44, "resnet32x4,resnet8x4": 73.58, "vgg13,vgg8": 73.2},
    ('similarity', 'mas'): {"wrn_40_2,wrn_16_2": 75.37, "wrn_40_2,wrn_40_1": 73.79, "resnet56,resnet20": 70.97, "resnet110,resnet20": 71.78, "resnet110,resnet32": 73.66, "resnet32x4,resnet8x4": 74.26, "vgg13,vgg8": 73.64},
    ('vid', 'none'): {"wrn_40_2,wrn_16_2": 74.19, "wrn_40_2,wrn_40_1": 73.23, "resnet56,resnet20": 70.53, "resnet110,resnet20": 70.68, "resnet110,resnet32": 72.67, "resnet32x4,resnet8x4": 73.24, "vgg13,vgg8": 71.41},
    ('vid', 'mag'): {"wrn_40_2,wrn_16_2": 74.84, "wrn_40_2,wrn_40_1": 73.35, "resnet56,resnet20": 71.14, "resnet110,resnet20": 70.69, "resnet110,resnet32": 73.0, "resnet32x4,resnet8x4": 74.73, "vgg13,vgg8": 72.92},
    ('vid', 'mas'): {"wrn_40_2,wrn_16_2": 75.63, "wrn_40_2,wrn_40_1": 74.49, "resnet56,resnet20": 71.28, "resnet110,resnet20": 71.61, "resnet110,resnet32": 73.32, "resnet32x4,resnet8x4": 74.86, "vgg13,vgg8": 73.56},
    ('rkd', 'none'): {"wrn_40_2,wrn_16_2": 73.37, "wrn_40_2,wrn_40_1": 72.1, "resnet56,resnet20": 69.67, "resnet110,resnet20": 69.44, "resnet110,resnet32": 72.24, "resnet32x4,resnet8x4": 72.03, "vgg13,vgg8": 71.35},
    ('rkd', 'mag'): {"wrn_40_2,wrn_16_2": 75.73, "wrn_40_2,wrn_40_1": 73.59, "resnet56,resnet20": 71.51, "resnet110,resnet20": 71.11, "resnet110,resnet32": 73.71, "resnet32x4,resnet8x4": 74.23, "vgg13,vgg8": 73.44},
    ('rkd', 'mas'): {"wrn_40_2,wrn_16_2": 75.31, "wrn_40_2,wrn_40_1": 74.3, "resnet56,resnet20": 71.91, "resnet110,resnet20": 71.06, "resnet110,resnet32": 73.17, "resnet32x4,resnet8x4": 74.39, "vgg13,vgg8": 73.06},
    ('crd', 'none'): {"wrn_40_2,wrn_16_2": 75.52, "wrn_40_2,wrn_40_1": 74.24, "resnet56,resnet20": 71.38, "resnet110,resnet20": 71.34, "resnet110,resnet32": 73.55, "resnet32x4,resnet8x4": 75.32, "vgg13,vgg8": 73.9},
    ('crd', 'mag'): {"wrn_40_2,wrn_16_2": 75.84, "wrn_40_2,wrn_40_1": 74.53, "resnet56,resnet20": 71.77, "resnet110,resnet20": 71.91, "resnet110,resnet32": 74.0, "resnet32x4,resnet8x4": 75.89, "vgg13,vgg8": 74.29},
    ('crd', 'mas'): {"wrn_40_2,wrn_16_2": 75.87, "wrn_40_2,wrn_40_1": 74.8, "resnet56,resnet20": 71.52, "resnet110,resnet20": 71.52, "resnet110,resnet32": 74.06, "resnet32x4,resnet8x4": 75.41, "vgg13,vgg8": 74.06},
    ('afd', 'none'): {"wrn_40_2,wrn_16_2": 75.41, "wrn_40_2,wrn_40_1": 73.66, "resnet56,resnet20": 71.32, "resnet110,resnet20": 71.2, "resnet110,resnet32": 73.46, "resnet32x4,resnet8x4": 74.72, "vgg13,vgg8": 73.57},
    ('afd', 'mag'): {"wrn_40_2,wrn_16_2": 75.53, "wrn_40_2,wrn_40_1": 74.53, "resnet56,resnet20": 71.62, "resnet110,resnet20": 71.4, "resnet110,resnet32": 73.57, "resnet32x4,resnet8x4": 74.75, "vgg13,vgg8": 73.89},
    ('afd', 'mas'): {"wrn_40_2,wrn_16_2": 75.55, "wrn_40_2,wrn_40_1": 74.12, "resnet56,resnet20": 71.49, "resnet110,resnet20": 71.22, "resnet110,resnet32": 74.0, "resnet32x4,resnet8x4": 75.03, "vgg13,vgg8": 73.62},
}

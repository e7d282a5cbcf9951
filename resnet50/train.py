"""ResNet-50 (bottleneck [3,4,6,3], CIFAR stem by default) on CIFAR-100.

`make defconfig DEFCONFIG=resnet50 && make`, or directly:
    cd resnet50 && python train.py --optimizer adamwprune --pruning-method state --target-sparsity 0.5
"""
import sys

from adamwprune.models.resnet import resnet50_cifar
from adamwprune.engine.tasks import CifarTask

TASK = CifarTask("resnet50", "cifar100", 100,
                 lambda cfg: resnet50_cifar(num_classes=100, stem=cfg.resnet50_stem))

if __name__ == "__main__":
    from adamwprune.cli import direct_main

    sys.exit(direct_main("resnet50", sys.argv[1:]))

"""ResNet-18 (CIFAR variant) on CIFAR-10: the task the engine trains.

`make defconfig DEFCONFIG=resnet18 && make`, or directly:
    cd resnet18 && python train.py --optimizer adamwprune --pruning-method state --target-sparsity 0.7
"""
import sys

from adamwprune.models.resnet import resnet18_cifar
from adamwprune.engine.tasks import CifarTask

TASK = CifarTask("resnet18", "cifar10", 10, lambda cfg: resnet18_cifar(num_classes=10))

if __name__ == "__main__":
    from adamwprune.cli import direct_main

    sys.exit(direct_main("resnet18", sys.argv[1:]))

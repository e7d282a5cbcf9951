"""LeNet-5 on MNIST: the task the engine trains.

Run through Kconfig (`make defconfig DEFCONFIG=lenet5 && make`) or directly:
    cd lenet5 && python train.py --optimizer adamw --pruning-method magnitude \
        --target-sparsity 0.7 --epochs 3
"""
import sys

from adamwprune.config.kconfig import resolve_path
from adamwprune.data import mnist
from adamwprune.models.lenet5 import LeNet5
from adamwprune.engine.tasks import ClassificationTask, Splits


class LeNet5Task(ClassificationTask):
    name = "lenet5"

    def build_model(self, cfg):
        return LeNet5()

    def build_data(self, cfg):
        loaders = {
            "mnist": lambda: mnist.load_torchvision(resolve_path(cfg.data_dir), cfg.val_size, cfg.seed, cfg.data_download),
            "mnist_embedded": lambda: mnist.load_embedded(cfg.val_size, seed=0),
            "synthetic": lambda: mnist.synthetic(cfg.synthetic_size, cfg.seed),
        }
        if cfg.dataset not in loaders:
            raise ValueError(f"LeNet-5 cannot train on dataset {cfg.dataset!r} (valid: {', '.join(loaders)})")
        return Splits(*loaders[cfg.dataset]())


TASK = LeNet5Task()

if __name__ == "__main__":
    from adamwprune.cli import direct_main

    sys.exit(direct_main("lenet5", sys.argv[1:]))

"""Datasets: MNIST (torchvision idx, embedded, synthetic), CIFAR, GPT-2 token and character shards."""

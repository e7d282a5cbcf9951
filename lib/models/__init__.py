"""The networks: LeNet-5, ResNet-18/50 for CIFAR, GPT-2 (nanoGPT)."""

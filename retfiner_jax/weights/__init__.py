"""Model weights: PyTorch checkpoints converted both ways, converted folders on disk, sizes read from tensors,
exports."""

"""Passes that change a torch model's weights or structure: training, pruning, distillation."""

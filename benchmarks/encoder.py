"""A small transformer encoder for digits (8x8 images, 2x2 patches as 16 tokens), in BERT's layout:
query/key/value Linears, post-LayerNorm residual blocks and a GELU feed-forward. Used by
`benchmarks/qat_vs_ptq.py --models encoder` as `benchmarks/encoder.py:digits_encoder`."""

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attention_output = nn.Linear(dim, dim)
        self.attention_norm = nn.LayerNorm(dim)
        self.intermediate = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.output = nn.Linear(hidden, dim)
        self.output_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        attn = ((q @ k.transpose(-2, -1)) / self.head_dim ** 0.5).softmax(dim=-1)
        context = (attn @ v).transpose(1, 2).reshape(b, n, d)
        x = self.attention_norm(x + self.attention_output(context))
        return self.output_norm(x + self.output(self.act(self.intermediate(x))))


class DigitsEncoder(nn.Module):
    def __init__(self, num_classes: int = 10, dim: int = 64, heads: int = 4, depth: int = 4, hidden: int = 128):
        super().__init__()
        # Overlapping patches with zero padding: the border tells the tokens where they are.
        self.patch = nn.Conv2d(1, dim, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden) for _ in range(depth))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=1))


def digits_encoder(num_classes: int = 10) -> nn.Module:
    return DigitsEncoder(num_classes)

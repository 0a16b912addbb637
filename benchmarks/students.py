"""A small student network for the distillation benchmark (about 25k parameters)."""

from torch import nn


def small_cnn(num_classes: int = 10) -> nn.Module:
    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 16, 1), *block(16, 32, 2), *block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
    )


class SmallTransformer(nn.Module):
    """A small transformer encoder over image patches (4 layers, width 128, 4 heads, about 0.6M parameters):
    2x2 patches of a 1-channel image as tokens, a learned position embedding, mean-pooled for the classes."""

    def __init__(self, num_classes: int = 10, tokens: int = 16, dim: int = 128, depth: int = 4):
        super().__init__()
        import torch

        self.patch = nn.Conv2d(1, dim, 2, stride=2)
        self.position = nn.Parameter(torch.zeros(1, tokens, dim))
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.position
        return self.head(self.norm(self.encoder(x)).mean(dim=1))


def small_transformer(num_classes: int = 10) -> nn.Module:
    return SmallTransformer(num_classes)

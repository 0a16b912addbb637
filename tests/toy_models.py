"""Tiny models the tests build from code (the file is also used as a FILE.py:FACTORY spec)."""

import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = 10, channels: int = 1, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    return TinyCNN(num_classes=num_classes)


class ExportDrift(TinyCNN):
    """TinyCNN whose exported graph adds 1e-3 to every logit: ONNX parity has a known error of 1e-3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y + 1e-3 if torch.onnx.is_in_onnx_export() else y


def export_drift(num_classes: int = 10) -> nn.Module:
    return ExportDrift(num_classes=num_classes)


class DynamoBreaks(TinyCNN):
    """TinyCNN with control flow on a tensor's value: torch.export refuses it, the TorchScript exporter traces the
    branch the example input takes (always this one)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y if x.abs().sum() >= 0 else -y


def dynamo_breaks(num_classes: int = 10) -> nn.Module:
    return DynamoBreaks(num_classes=num_classes)


def tiny_cnn_rgb(num_classes: int = 10) -> nn.Module:
    return TinyCNN(num_classes=num_classes, channels=3)


def not_a_module():
    return 42


def broken_factory():
    raise RuntimeError("factory exploded")


def wide_cnn_rgb(num_classes: int = 10) -> nn.Module:
    """Heavy enough convolutions that INT8 pays off on onnxruntime (used by the PTQ tests)."""
    return TinyCNN(num_classes=num_classes, channels=3, width=64)


class ResidualNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.b(self.a(x))  # residual add: stem, a and b outputs must keep the same channels
        return self.head(x.mean((2, 3)))


class GainConv2d(nn.Conv2d):
    """A convolution with its own per-output-channel gain (as timm's ScaledStdConv2d in NFNet)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, self.out_channels).view(-1, 1, 1, 1))

    def forward(self, x):
        return self._conv_forward(x, self.weight * self.gain, self.bias)


class GainNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(GainConv2d(3, 16, 3, padding=1), nn.ReLU(), GainConv2d(16, 32, 3, padding=1),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def gain_net(num_classes: int = 10) -> nn.Module:
    return GainNet(num_classes)


class ConcatSplitNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.left = nn.Conv2d(3, 8, 3, padding=1)
        self.right = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Conv2d(16, 16, 1)
        self.after_a = nn.Conv2d(8, 8, 3, padding=1)
        self.after_b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], dim=1)  # concatenation
        # split; the sizes follow the consumers, so they stay right when pruning changes them
        a, b = torch.split(torch.relu(self.mix(x)), [self.after_a.in_channels, self.after_b.in_channels], dim=1)
        x = torch.cat([self.after_a(a), self.after_b(b)], dim=1)
        return self.head(x.mean((2, 3)))


class GroupedNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pointwise = nn.Conv2d(32, 32, 1)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.grouped(x))
        x = torch.relu(self.pointwise(torch.relu(self.depthwise(x))))
        return self.head(x.mean((2, 3)))


class AttentionNet(nn.Module):
    """Input (batch, tokens, features): an embedding, self-attention and a classifier."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.attn = nn.MultiheadAttention(32, num_heads=4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = h + self.mlp(h)
        return self.head(h.mean(1))


def residual_net(num_classes: int = 10) -> nn.Module:
    return ResidualNet(num_classes)


def concat_split_net(num_classes: int = 10) -> nn.Module:
    return ConcatSplitNet(num_classes)


def grouped_net(num_classes: int = 10) -> nn.Module:
    return GroupedNet(num_classes)


def attention_net(num_classes: int = 10) -> nn.Module:
    return AttentionNet(num_classes)


class Untraceable(nn.Module):
    """Runs for inference but fails when traced with gradients (as Torch-Pruning traces)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        if torch.is_grad_enabled():
            raise RuntimeError("custom op without autograd support")
        return self.head(self.conv(x).mean((2, 3)))


def untraceable(num_classes: int = 10) -> nn.Module:
    return Untraceable(num_classes)


class HeadAttention(nn.Module):
    """Multi-head self-attention in timm's layout: one qkv Linear, num_heads, head_dim and attn_dim attributes
    (timm 1.0 reshapes the heads' output with attn_dim)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dim = dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.head_dim ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.attn_dim))


class TinyViT(nn.Module):
    def __init__(self, num_classes: int = 10, dim: int = 32, heads: int = 4, depth: int = 2):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 2, stride=2)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(nn.ModuleDict({
                "norm1": nn.LayerNorm(dim), "attn": HeadAttention(dim, heads), "norm2": nn.LayerNorm(dim),
                "mlp": nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)),
            }))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        for blk in self.blocks:
            x = x + blk["attn"](blk["norm1"](x))
            x = x + blk["mlp"](blk["norm2"](x))
        return self.head(x.mean(dim=1))


def tiny_vit(num_classes: int = 10) -> nn.Module:
    return TinyViT(num_classes)


class BertSelfAttention(nn.Module):
    """Self-attention in BERT's layout: query, key and value Linears, num_attention_heads and head sizes."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_attention_heads = heads
        self.attention_head_size = dim // heads
        self.all_head_size = dim
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape

        def heads(t):
            return t.view(b, n, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        attn = ((q @ k.transpose(-2, -1)) / self.attention_head_size ** 0.5).softmax(dim=-1)
        return (attn @ v).transpose(1, 2).reshape(b, n, self.all_head_size)


class TinyBertLike(nn.Module):
    """Patches of an image as tokens through BERT-layout encoder layers."""

    def __init__(self, num_classes: int = 10, dim: int = 32, heads: int = 4, depth: int = 2):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 2, stride=2)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "attention": BertSelfAttention(dim, heads), "output": nn.Linear(dim, dim), "norm": nn.LayerNorm(dim),
        }) for _ in range(depth))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        for layer in self.layers:
            x = layer["norm"](x + layer["output"](layer["attention"](x)))
        return self.head(x.mean(dim=1))


def tiny_bert_like(num_classes: int = 10) -> nn.Module:
    return TinyBertLike(num_classes)


def bn_after_relu(num_classes: int = 10) -> nn.Module:
    """A batch norm that follows a ReLU, not a convolution: it cannot be folded at export."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, num_classes))


class UntraceableCNN(nn.Module):
    """torch.fx cannot trace control flow on a tensor's rank; torch.export can."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(8, num_classes)

    def forward(self, x):
        if x.dim() == 3:  # one unbatched image
            x = x.unsqueeze(0)
        return self.classifier(self.features(x).flatten(1))


def untraceable_cnn(num_classes: int = 10) -> nn.Module:
    return UntraceableCNN(num_classes)


class VersionedCNN(TinyCNN):
    """Reads the per-module version saved with its weights, as torchvision's MNASNet does."""

    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        if local_metadata.get("version") != 2:
            raise ValueError(f"version should be 2 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def versioned_cnn(num_classes: int = 10) -> nn.Module:
    return VersionedCNN(num_classes)


class NoParams(nn.Module):
    """Logits read straight off the pixels: a model with nothing to train."""

    def forward(self, x):
        return x.flatten(1)[:, :10]


def no_params(num_classes: int = 10) -> nn.Module:
    return NoParams()


class TiedNet(nn.Module):
    """Weights used outside the module that holds them: two blocks share one Linear, and the parent's forward
    reads the third block's weight directly. Only the fourth block keeps its weights to itself."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.inp = nn.Linear(64, 32)
        shared = nn.Linear(32, 32)
        self.blocks = nn.Sequential(*(nn.Sequential(layer, nn.ReLU())
                                      for layer in (shared, shared, nn.Linear(32, 32), nn.Linear(32, 32))))
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        h = self.blocks(self.inp(x.flatten(1)))
        return self.head(h + torch.nn.functional.linear(h, self.blocks[2][0].weight))


def tied_net(num_classes: int = 10) -> nn.Module:
    return TiedNet(num_classes)


class GluMlp(nn.Module):
    """A gated feed-forward: one Linear's output chunked in two along the channels (EVA-02, LLaMA-style)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(torch.nn.functional.silu(x1) * x2)


class GluViT(nn.Module):
    """Patch tokens with a learned position embedding (a 3-d parameter, as a ViT's) and gated feed-forwards."""

    def __init__(self, num_classes: int = 10, dim: int = 16, hidden: int = 32):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.pos_embed = nn.Parameter(torch.randn(1, 4, dim) * 0.02)
        self.blocks = nn.ModuleList(GluMlp(dim, hidden) for _ in range(2))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean(1))


def glu_vit(num_classes: int = 10) -> nn.Module:
    return GluViT(num_classes)

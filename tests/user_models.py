"""Users' own architectures with the patterns structured pruning trips on (also used as FILE.py:FACTORY specs).

Each factory takes `num_classes` and builds a model for 3x64x64 images.
"""

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class SwappedSplit(nn.Module):
    """Split the channels in halves, transform one, concatenate them back in swapped order, add a 1x1-projected
    shortcut from one half."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(nn.Conv2d(half, 2 * half, 1), nn.BatchNorm2d(2 * half), nn.ReLU(),
                                    nn.Conv2d(2 * half, 2 * half, 3, padding=1, groups=2 * half),
                                    nn.BatchNorm2d(2 * half), nn.Conv2d(2 * half, half, 1), nn.ReLU())
        self.project = nn.Conv2d(half, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.cat([self.branch(b), a], dim=1) + self.project(a)


class SpatialAttention(nn.Module):
    """nn.MultiheadAttention over the spatial positions as tokens, with a LayerNorm."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = self.norm(x.flatten(2).transpose(1, 2))
        out, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return x + out.transpose(1, 2).reshape(n, c, h, w)


class UserNet(nn.Module):
    """The model of the issue: depthwise and grouped convolutions, squeeze-excitation, a concatenation of two
    branches, a swapped split with a projected shortcut, attention over spatial tokens, LayerNorm, Linear head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU(),
                                       nn.Conv2d(32, 64, 1), nn.BatchNorm2d(64), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(64, 64, 3, stride=2, padding=1, groups=4), nn.BatchNorm2d(64), nn.ReLU())
        self.se = SqueezeExcite(64, 16)
        self.left = nn.Sequential(nn.Conv2d(64, 48, 3, padding=1), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(64, 48, 1), nn.ReLU())
        self.split = SwappedSplit(96)
        self.down = nn.Sequential(nn.Conv2d(96, 128, 3, stride=2, padding=1), nn.BatchNorm2d(128), nn.ReLU())
        self.attention = SpatialAttention(128, 4)
        self.norm = nn.LayerNorm(128)
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.se(self.grouped(self.depthwise(self.stem(x))))
        x = self.split(torch.cat([self.left(x), self.right(x)], dim=1))
        x = self.attention(self.down(x))
        return self.head(self.norm(x.mean((2, 3))))


def user_net(num_classes: int = 10) -> nn.Module:
    return UserNet(num_classes)


class LayerScaleBlock(nn.Module):
    """ConvNeXt's pattern: depthwise 7x7, LayerNorm over the channels (channels last), an MLP, a learned
    per-channel layer scale, and a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.fc1 = nn.Linear(channels, 4 * channels)
        self.fc2 = nn.Linear(4 * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.gamma * self.fc2(torch.nn.functional.gelu(self.fc1(y)))
        return x + y.permute(0, 3, 1, 2)


class ChannelsNorm(nn.Module):
    """LayerNorm over the channels of an NCHW tensor."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FixedWidth(nn.Module):
    """Reshapes with a width fixed when it was built: the model stops running when that width is pruned."""

    def __init__(self, channels: int):
        super().__init__()
        self.fixed = channels
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        n, _, h, w = y.shape
        return y.reshape(n, self.fixed, h * w).softmax(-1).reshape(y.shape) * y


PATTERNS = {
    "swapped_split": lambda c: SwappedSplit(c),
    "squeeze_excite": lambda c: SqueezeExcite(c, c // 4),
    "grouped": lambda c: nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=4), nn.BatchNorm2d(c), nn.ReLU()),
    "depthwise": lambda c: nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.ReLU(),
                                         nn.Conv2d(c, c, 1)),
    "spatial_attention": lambda c: SpatialAttention(c, 4),
    "layer_scale": lambda c: LayerScaleBlock(c),
    "channels_layernorm": lambda c: nn.Sequential(nn.Conv2d(c, c, 3, padding=1), ChannelsNorm(c), nn.GELU()),
    "fixed_width": lambda c: FixedWidth(c),
}


class PatternNet(nn.Module):
    """A stem, two blocks of one pattern with a convolution between them, and a Linear head."""

    def __init__(self, pattern: str, num_classes: int = 10, channels: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        self.block1 = PATTERNS[pattern](channels)
        self.mid = nn.Sequential(nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU())
        self.block2 = PATTERNS[pattern](channels)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.mid(self.block1(self.stem(x))))
        return self.head(x.mean((2, 3)))


def pattern_net(pattern: str, num_classes: int = 10) -> nn.Module:
    return PatternNet(pattern, num_classes)


def conv_classifier(num_classes: int = 10) -> nn.Module:
    """squeezenet's layout: the classifier is a final 1x1 convolution, then global pooling."""
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(64, num_classes, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def small_vit(num_classes: int = 10) -> nn.Module:
    """torchvision's VisionTransformer code at a small size (3x32x32)."""
    import torchvision

    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                                mlp_dim=128, num_classes=num_classes)


def small_swin(num_classes: int = 10) -> nn.Module:
    """torchvision's Swin Transformer code at a small size (3x64x64)."""
    import torchvision

    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                              window_size=[4, 4], num_classes=num_classes)


class UNet(nn.Module):
    """A small U-Net: strided convolutions down, transposed convolutions up, skip connections concatenated, and a
    dense output (batch, classes, height, width) instead of logits."""

    def __init__(self, num_classes: int = 4, width: int = 8):
        super().__init__()
        c = width

        def block(cin: int, cout: int, stride: int = 1) -> nn.Module:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.down1, self.down2, self.down3 = block(3, c), block(c, 2 * c, 2), block(2 * c, 4 * c, 2)
        self.up2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2)
        self.merge2 = block(4 * c, 2 * c)
        self.up1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.merge1 = block(2 * c, c)
        self.head = nn.Conv2d(c, num_classes, 1)

    def forward(self, x):
        a = self.down1(x)
        b = self.down2(a)
        y = self.merge2(torch.cat([self.up2(self.down3(b)), b], 1))
        return self.head(self.merge1(torch.cat([self.up1(y), a], 1)))


def unet(num_classes: int = 4) -> nn.Module:
    return UNet(num_classes)


class TwoHeads(nn.Module):
    """Class logits and a box, as a tuple."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.cls, self.box = nn.Linear(8, num_classes), nn.Linear(8, 4)

    def forward(self, x):
        h = self.features(x)
        return self.cls(h), self.box(h)


def two_heads(num_classes: int = 10) -> nn.Module:
    return TwoHeads(num_classes)


class WeightNormed(nn.Module):
    """Convolutions under weight norm, as audio models use it: one parametrized (torch.nn.utils.parametrizations),
    one with the older hook (torch.nn.utils.weight_norm), and a spectral-normed Linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        import warnings

        self.c1 = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 16, 3, padding=1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the older hook is deprecated, and still in models
            self.c2 = nn.utils.weight_norm(nn.Conv2d(16, 32, 3, padding=1))
        self.mid = nn.utils.parametrizations.spectral_norm(nn.Linear(32, 32))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x)).mean((2, 3))
        return self.fc(torch.relu(self.mid(x)))


def weight_normed(num_classes: int = 10) -> nn.Module:
    return WeightNormed(num_classes)


class AudioGru(nn.Module):
    """A 1-d convolution front end and a GRU over its time steps, as small audio and sensor models are built."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.front = nn.Sequential(nn.Conv1d(1, 16, 5, stride=2), nn.BatchNorm1d(16), nn.ReLU(), nn.Conv1d(16, 32, 3),
                                   nn.ReLU())
        self.gru = nn.GRU(32, 24, batch_first=True)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x):
        out, _ = self.gru(self.front(x).transpose(1, 2))
        return self.fc(out[:, -1])


def audio_gru(num_classes: int = 10) -> nn.Module:
    return AudioGru(num_classes)


def half_cnn(num_classes: int = 10) -> nn.Module:
    """A model whose weights are float16, as checkpoints often are."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes)).half()


def scripted_block(num_classes: int = 10) -> nn.Module:
    """A model with a torch.jit.script'ed block inside."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, and still in models
        block = torch.jit.script(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()))
    return nn.Sequential(block, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


class DictHeads(TwoHeads):
    """The same heads, returned as a dict."""

    def forward(self, x):
        h = self.features(x)
        return {"classes": self.cls(h), "box": self.box(h)}


def dict_heads(num_classes: int = 10) -> nn.Module:
    return DictHeads(num_classes)


class TokenCnn(nn.Module):
    """A text classifier on token ids (not a Hugging Face model): an embedding, a 1-d convolution, max over time."""

    def __init__(self, num_classes: int = 4, vocab: int = 50, dim: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.conv = nn.Conv1d(dim, 64, 3, padding=1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(self.emb(ids).transpose(1, 2)))
        return self.fc(h.amax(-1))


def token_cnn(num_classes: int = 4) -> nn.Module:
    return TokenCnn(num_classes)


class TokenTransformer(nn.Module):
    """Token ids through an embedding (3 ids: fewer than the ids 0..4 timing makes up for an integer input of
    unknown meaning), learned positions (an embedding fed with positions, not with the input),
    nn.TransformerEncoder, mean over time."""

    def __init__(self, num_classes: int = 3, vocab: int = 3, dim: int = 32, length: int = 64):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, dim), nn.Embedding(length, dim)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(dim, 4, 64, batch_first=True), 2)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        return self.fc(self.enc(h).mean(1))


def token_transformer(num_classes: int = 3) -> nn.Module:
    return TokenTransformer(num_classes)


class PositionsOnly(nn.Module):
    """Float features plus a learned position embedding: an nn.Embedding that never reads the input."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.pos = nn.Embedding(16, 8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((x + self.pos(torch.arange(x.shape[1]))).mean(1))


def positions_only(num_classes: int = 3) -> nn.Module:
    return PositionsOnly(num_classes)


def small_vocab_cnn(num_classes: int = 4) -> nn.Module:
    """TokenCnn with 7 ids: it cannot read the ids of a 50-id model's data."""
    return TokenCnn(num_classes, vocab=7)


def float_mlp(num_classes: int = 4) -> nn.Module:
    """16 float features in, as many outputs as TokenCnn: the same shapes, but floats, not ids."""
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, num_classes))


class TwoTables(nn.Module):
    """The ids read by two embeddings, the second smaller: every id must be below the smaller one."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.words, self.tags = nn.Embedding(100, 16), nn.Embedding(10, 16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc((self.words(ids) + self.tags(ids)).mean(1))


def two_tables(num_classes: int = 4) -> nn.Module:
    return TwoTables(num_classes)


class CastIds(nn.Module):
    """Integer input used as numbers (cast to float), not as ids into a table."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(ids.float())

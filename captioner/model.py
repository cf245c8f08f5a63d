"""Show-and-Tell in torch: CNN encoder -> pooled features -> bottleneck -> (h0, c0);
Embedding -> LSTM -> logit bottleneck -> vocabulary.

`ModelArgs` is the one record of the architecture; it is saved with the checkpoint
and every consumer rebuilds the model from it.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .preprocess import IMAGENET, PreprocessConfig

BACKBONES = ("small_cnn", "inception_v3", "resnet50")


@dataclass
class ModelArgs:
    vocab_size: int
    backbone: str = "small_cnn"
    image_bottleneck: int = 120
    lstm_units: int = 300
    embedding_dim: int = 100
    logit_bottleneck: int = 120
    max_length: int = 20  # decode steps, END included
    # small_cnn only
    cnn_channels: tuple[int, ...] = (32, 64, 128, 128)
    cnn_grid: int = 4
    coord_channels: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cnn_channels"] = list(self.cnn_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model args {sorted(unknown)}")
        d = dict(d)
        if "cnn_channels" in d:
            d["cnn_channels"] = tuple(d["cnn_channels"])
        return cls(**d)


def default_preprocess(backbone: str, image_size: int | None = None) -> PreprocessConfig:
    if backbone == "small_cnn":
        return PreprocessConfig(image_size or 64, "bilinear")
    if backbone == "inception_v3":
        return PreprocessConfig(image_size or 299, "bilinear", **IMAGENET)
    if backbone == "resnet50":
        return PreprocessConfig(image_size or 224, "bilinear", **IMAGENET)
    raise ValueError(f"unknown backbone {backbone!r}; choose from {BACKBONES}")


class SmallCNN(nn.Module):
    """Stride-2 conv stages, then a small grid pooled and flattened. Relation words
    need object positions, which global average pooling would throw away; coordinate
    channels and the grid keep them, while the interface stays image -> vector."""

    def __init__(self, channels: tuple[int, ...], grid: int, coord_channels: bool):
        super().__init__()
        self.coord_channels = coord_channels
        layers, c_in = [], 3 + (2 if coord_channels else 0)
        for c_out in channels:
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.out_dim = c_in * grid * grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.coord_channels:
            n, _, h, w = x.shape
            ys = torch.linspace(-1.0, 1.0, h, dtype=x.dtype, device=x.device).view(1, 1, h, 1).expand(n, 1, h, w)
            xs = torch.linspace(-1.0, 1.0, w, dtype=x.dtype, device=x.device).view(1, 1, 1, w).expand(n, 1, h, w)
            x = torch.cat([x, xs, ys], dim=1)
        return self.pool(self.body(x)).flatten(1)


def _load_state_dict_file(module: nn.Module, path: str | Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch's own message suggests weights_only=False, which we never want
        raise ValueError(f"{path}: not a torch state-dict file ({type(e).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict")
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches: a different architecture's weights
        detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise ValueError(f"{path}: weights do not fit {type(module).__name__}: {detail}") from None
    # The classifier head (fc / AuxLogits) is dropped for feature extraction.
    real_missing = [k for k in missing if not k.startswith(("fc.", "AuxLogits."))]
    if real_missing:
        raise ValueError(f"{path}: weight file lacks {len(real_missing)} backbone tensors, e.g. {real_missing[:3]}")
    if unexpected:
        raise ValueError(f"{path}: weight file has {len(unexpected)} unknown tensors, e.g. {unexpected[:3]}")


class TorchvisionBackbone(nn.Module):
    """A torchvision classifier with its head removed: image -> globally pooled features."""

    def __init__(self, name: str, weights_path: str | Path | None):
        super().__init__()
        import torchvision

        if name == "inception_v3":
            net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=weights_path is None)
            net.aux_logits, net.AuxLogits = False, None
        elif name == "resnet50":
            net = torchvision.models.resnet50(weights=None)
        else:
            raise ValueError(f"unknown backbone {name!r}")
        if weights_path:
            _load_state_dict_file(net, weights_path)
        else:
            warnings.warn(
                f"{name}: no weight file given, using RANDOM weights. Captions from this encoder are "
                "meaningless; it is good for speed measurements only.",
                stacklevel=2,
            )
        self.out_dim = net.fc.in_features
        net.fc = nn.Identity()
        if name == "inception_v3":
            net.transform_input = False  # normalisation is done once, in preprocessing
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out.logits if hasattr(out, "logits") else out


Backbone = SmallCNN | TorchvisionBackbone  # image -> features [N, out_dim]


def build_backbone(args: ModelArgs, weights_path: str | Path | None = None) -> Backbone:
    if args.backbone == "small_cnn":
        return SmallCNN(args.cnn_channels, args.cnn_grid, args.coord_channels)
    return TorchvisionBackbone(args.backbone, weights_path)


class Encoder(nn.Module):
    """image -> (h0, c0); the seed uses the same vector for both."""

    def __init__(self, args: ModelArgs, backbone: Backbone):
        super().__init__()
        self.backbone = backbone
        self.bottleneck = nn.Linear(backbone.out_dim, args.image_bottleneck)
        self.to_state = nn.Linear(args.image_bottleneck, args.lstm_units)

    def from_features(self, feats: torch.Tensor) -> torch.Tensor:
        return F.elu(self.to_state(F.elu(self.bottleneck(feats))))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h0 = self.from_features(self.backbone(images))
        return h0, h0


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed = nn.Embedding(args.vocab_size, args.embedding_dim)
        self.lstm = nn.LSTM(args.embedding_dim, args.lstm_units, batch_first=True)
        self.logit_bottleneck = nn.Linear(args.lstm_units, args.logit_bottleneck)
        self.logits = nn.Linear(args.logit_bottleneck, args.vocab_size)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits(F.elu(self.logit_bottleneck(hidden)))

    def forward(self, tokens: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: tokens [N, T] -> logits [N, T, V]."""
        out, _ = self.lstm(self.embed(tokens), (h0.unsqueeze(0), c0.unsqueeze(0)))
        return self._head(out)

    def step(self, tokens: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        """One token for every live sequence: (tokens [N], h [N,U], c [N,U]) -> (log-probs [N,V], h', c').
        Written with the LSTM's own weights as plain matmuls so that it exports to
        simple ONNX ops that every runtime handles the same way."""
        x = self.embed(tokens)
        # nn.LSTM registers its weights by name at run time: torch types them Tensor | Module.
        w_ih, w_hh = cast(torch.Tensor, self.lstm.weight_ih_l0), cast(torch.Tensor, self.lstm.weight_hh_l0)
        gates = x @ w_ih.t() + self.lstm.bias_ih_l0 + h @ w_hh.t() + self.lstm.bias_hh_l0
        i, f, g, o = gates.chunk(4, dim=1)
        c2 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h2 = torch.sigmoid(o) * torch.tanh(c2)
        return F.log_softmax(self._head(h2), dim=-1), h2, c2


class CaptionModel(nn.Module):
    def __init__(self, args: ModelArgs, backbone_weights: str | Path | None = None):
        super().__init__()
        self.args = args
        self.encoder = Encoder(args, build_backbone(args, backbone_weights))
        self.decoder = Decoder(args)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        h0, c0 = self.encoder(images)
        return self.decoder(tokens, h0, c0)


class EncoderExport(nn.Module):
    """What the encoder ONNX graph / TensorRT engine computes."""

    def __init__(self, model: CaptionModel):
        super().__init__()
        self.encoder = model.encoder

    def forward(self, image: torch.Tensor):
        return self.encoder(image)


class DecoderStepExport(nn.Module):
    """What the decoder-step ONNX graph computes."""

    def __init__(self, model: CaptionModel):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, tokens: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        return self.decoder.step(tokens, h, c)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, pad_idx: int, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over non-padding target positions only: their mean, or with
    reduction="sum" their sum (training normalises by the global batch's token count)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=pad_idx, reduction=reduction)

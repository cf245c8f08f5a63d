import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from captioner import checkpoint
from captioner.model import CaptionModel, DecoderStepExport, EncoderExport, ModelArgs, default_preprocess, masked_cross_entropy
from captioner.preprocess import IMAGENET
from captioner.vocab import SPECIALS, Vocabulary

V = 23


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return CaptionModel(ModelArgs(vocab_size=V)).eval()


def test_small_cnn_shapes(small):
    images = torch.randn(3, 3, 64, 64)
    tokens = torch.randint(0, V, (3, 7))
    with torch.no_grad():
        assert small(images, tokens).shape == (3, 7, V)
        h0, c0 = EncoderExport(small)(images)
        assert h0.shape == c0.shape == (3, 300)
        assert torch.equal(h0, c0)  # Show and Tell: one vector starts both
        logp, h, c = DecoderStepExport(small)(tokens[:, 0], h0, c0)
    assert logp.shape == (3, V) and h.shape == c.shape == (3, 300)
    assert torch.allclose(logp.exp().sum(1), torch.ones(3), atol=1e-5)


def test_small_cnn_sees_position(small):
    """Relation words need where things are: moving a blob must change the encoding."""
    a = torch.zeros(1, 3, 64, 64)
    b = torch.zeros(1, 3, 64, 64)
    a[..., 8:20, 8:20] = 1.0
    b[..., 44:56, 44:56] = 1.0
    with torch.no_grad():
        fa, fb = small.encoder.backbone(a), small.encoder.backbone(b)
    assert fa.shape == (1, 128 * 4 * 4)
    # Same blob, same pixel total: a globally pooled CNN would give (nearly) equal vectors.
    assert (fa - fb).norm() > 0.2 * fa.norm()


def test_step_equals_the_lstm_sequence(small):
    """The exported step (plain matmuls) must be the trained nn.LSTM, token by token."""
    torch.manual_seed(1)
    tokens = torch.randint(0, V, (4, 9))
    h0 = torch.randn(4, 300) * 0.5
    c0 = torch.randn(4, 300) * 0.5
    with torch.no_grad():
        seq = F.log_softmax(small.decoder(tokens, h0, c0), dim=-1)
        h, c = h0, c0
        for t in range(tokens.shape[1]):
            logp, h, c = small.decoder.step(tokens[:, t], h, c)
            assert torch.allclose(logp, seq[:, t], atol=1e-5), t


def test_loss_ignores_padding():
    torch.manual_seed(2)
    pad = 0
    logits = torch.randn(2, 5, V)
    targets = torch.tensor([[4, 5, 6, 2, pad], [7, 2, pad, pad, pad]])
    loss = masked_cross_entropy(logits, targets, pad)
    by_hand = np.mean(
        [-F.log_softmax(logits[i, t], -1)[targets[i, t]].item() for i in range(2) for t in range(5) if targets[i, t] != pad]
    )
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    # training sums and divides by the global batch's token count itself
    summed = masked_cross_entropy(logits, targets, pad, reduction="sum")
    assert summed.item() == pytest.approx(by_hand * int((targets != pad).sum()), rel=1e-6)
    changed = logits.clone()
    changed[0, 4] = torch.randn(V) * 10  # what the model says at padded positions is irrelevant
    changed[1, 2:] = torch.randn(3, V) * 10
    assert masked_cross_entropy(changed, targets, pad).item() == pytest.approx(loss.item(), rel=1e-6)
    longer = torch.cat([targets, torch.full((2, 3), pad)], 1)  # more padding, same loss
    assert masked_cross_entropy(torch.cat([logits, torch.randn(2, 3, V)], 1), longer, pad).item() == pytest.approx(
        loss.item(), rel=1e-6
    )


def test_resnet50_shapes_and_random_weights_warning():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        m = CaptionModel(ModelArgs(vocab_size=V, backbone="resnet50")).eval()
    with torch.no_grad():
        h0, c0 = m.encoder(torch.randn(2, 3, 64, 64))
        assert m.encoder.backbone(torch.randn(1, 3, 64, 64)).shape == (1, 2048)
    assert h0.shape == c0.shape == (2, 300)


def test_inception_v3_shapes():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        m = CaptionModel(ModelArgs(vocab_size=V, backbone="inception_v3")).eval()
    assert m.encoder.backbone.net.transform_input is False, "normalisation belongs to preprocessing only"
    with torch.no_grad():
        # 299 px is the model's size; any size from 75 px gives the same 2048 features, faster.
        feats = m.encoder.backbone(torch.randn(1, 3, 96, 96))
        logits = m(torch.randn(1, 3, 96, 96), torch.randint(0, V, (1, 4)))
    assert feats.shape == (1, 2048) and logits.shape == (1, 4, V)


def test_default_preprocess_per_backbone():
    assert default_preprocess("small_cnn").image_size == 64
    assert default_preprocess("inception_v3").image_size == 299
    r = default_preprocess("resnet50", 128)
    assert r.image_size == 128 and r.mean == IMAGENET["mean"] and r.std == IMAGENET["std"]
    with pytest.raises(ValueError, match="unknown backbone"):
        default_preprocess("vgg16")


def test_backbone_weights_from_a_torchvision_state_dict_file(tmp_path):
    import torchvision

    torch.manual_seed(3)
    reference = torchvision.models.resnet50(weights=None).state_dict()
    path = tmp_path / "resnet50.pth"
    torch.save(reference, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a weight file means no random-weights warning
        m = CaptionModel(ModelArgs(vocab_size=V, backbone="resnet50"), backbone_weights=path)
    got = m.encoder.backbone.net.state_dict()
    compared = 0
    for k, v in reference.items():
        if k.startswith("fc."):
            assert k not in got, "the classifier head is removed"
            continue
        assert torch.equal(got[k], v), k
        compared += 1
    assert compared == len(got) > 300


def test_bad_weight_files_are_clear_errors(tmp_path):
    import torchvision

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"these are not weights")
    with pytest.raises(ValueError, match="junk.pth: not a torch state-dict file"):
        CaptionModel(ModelArgs(vocab_size=V, backbone="resnet50"), backbone_weights=junk)
    other = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), other)
    with pytest.raises(ValueError, match="resnet18.pth: weights do not fit"):
        CaptionModel(ModelArgs(vocab_size=V, backbone="resnet50"), backbone_weights=other)
    partial = tmp_path / "partial.pth"
    state = torchvision.models.resnet50(weights=None).state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4.")}, partial)
    with pytest.raises(ValueError, match="lacks .* backbone tensors"):
        CaptionModel(ModelArgs(vocab_size=V, backbone="resnet50"), backbone_weights=partial)
    with pytest.raises(FileNotFoundError):
        CaptionModel(ModelArgs(vocab_size=V, backbone="resnet50"), backbone_weights=tmp_path / "missing.pth")


def test_model_args_round_trip_and_unknown_keys():
    a = ModelArgs(vocab_size=40, lstm_units=64, cnn_channels=(8, 16))
    assert ModelArgs.from_dict(a.to_dict()) == a
    with pytest.raises(ValueError, match="unknown model args"):
        ModelArgs.from_dict({**a.to_dict(), "dropout": 0.5})


def test_checkpoint_round_trip(tmp_path, small):
    vocab = Vocabulary(list(SPECIALS) + [f"w{i}" for i in range(V - 4)])
    ck = checkpoint.Checkpoint(small.args, default_preprocess("small_cnn"), vocab, small, meta={"epoch": 3})
    ck.save(tmp_path)
    assert not (tmp_path / "model.pt.tmp").exists()
    loaded = checkpoint.load(tmp_path)
    assert loaded.args == small.args and loaded.preprocess == ck.preprocess and loaded.vocab.itos == vocab.itos
    assert loaded.meta == {"epoch": 3} and loaded.path == tmp_path / "model.pt"
    assert not loaded.model.training
    assert len(loaded.sha256) == 64 and loaded.sha256 == checkpoint.file_sha256(tmp_path / "model.pt")
    x = torch.randn(2, 3, 64, 64)
    t = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        assert torch.equal(loaded.model(x, t), small(x, t))
    with pytest.raises(FileNotFoundError):
        checkpoint.load(tmp_path / "nowhere")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a captioner-checkpoint-v1"):
        checkpoint.load(tmp_path / "other.pt")

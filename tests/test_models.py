"""Adapters: the stream at every read-out point equals what the model itself computes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from support import TINY_SPECS
from torch import nn

from workflow_scripts.fetch_model import fetch
from workflow_scripts.models import family_module, load_adapter, load_model, write_model_files
from workflow_scripts.models.hooked import SkippedBlock
from workflow_scripts.models.norms import ScalarRMSNorm
from workflow_scripts.models.resnet import ResNet, ResNetAdapter

PREMISES = ["the tall teacher carried the book in the park .", "the old pilot found the map ."]
HYPOTHESES = ["a person carried the book .", "nobody found the map in the office ."]


def encode(adapter):
    return dict(adapter.tokenizer(PREMISES, HYPOTHESES, padding=True, return_tensors="pt"))


@pytest.mark.parametrize("family", ["gpt2", "gptr2", "roberta", "bert"])
def test_text_streams_equal_hugging_face_hidden_states(model_dirs, family):
    adapter, manifest = load_adapter(model_dirs[family])
    inputs = encode(adapter)
    assert (inputs["attention_mask"] == 0).any()  # the batch has padding
    with torch.no_grad():
        streams = adapter.streams(inputs)
        hidden = adapter.model(**inputs, output_hidden_states=True).hidden_states
    assert len(streams) == len(hidden) == len(adapter.readouts) == 3
    assert [r.block for r in adapter.readouts] == [0, 1, 2]
    last = len(streams) - 1
    for k, (stream, reference) in enumerate(zip(streams, hidden)):
        assert stream.shape == reference.shape == (2, inputs["input_ids"].shape[1], 32)
        if family in ("gpt2", "gptr2") and k == last:
            # Hugging Face reports GPT-2's last hidden state after ln_f; the adapter the raw stream
            torch.testing.assert_close(adapter.final_norm(stream), reference, rtol=0, atol=0)
            assert not torch.allclose(stream, reference)
        else:
            torch.testing.assert_close(stream, reference, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gpt2", "gptr2"])
def test_gpt2_final_readout_can_follow_the_study(model_dirs, family):
    adapter, _ = load_adapter(model_dirs[family], final_readout="final_norm")
    inputs = encode(adapter)
    with torch.no_grad():
        streams = adapter.streams(inputs)
        hidden = adapter.model(**inputs, output_hidden_states=True).hidden_states
    torch.testing.assert_close(streams[-1], hidden[-1], rtol=0, atol=0)


def test_gptr2_has_only_scalar_gain_rms_norms(model_dirs):
    adapter, manifest = load_adapter(model_dirs["gptr2"])
    assert manifest["family"] == "gptr2"
    assert not any(isinstance(m, nn.LayerNorm) for m in adapter.model.modules())
    norms = [m for m in adapter.model.modules() if isinstance(m, ScalarRMSNorm)]
    assert len(norms) == 2 * 2 + 1  # ln_1 and ln_2 per block, ln_f
    assert all(n.weight.shape == (1,) for n in norms)
    x = torch.randn(5, 32, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    norm = norms[0].double()
    torch.testing.assert_close(norm(x @ q), norm(x) @ q)  # basis-independent


@pytest.mark.parametrize("family", ["gpt2", "gptr2", "roberta", "bert"])
def test_skipped_block_returns_what_the_block_returns(model_dirs, family):
    """Called as the model calls its blocks, the skipped block returns the same kind of thing
    as the block, holding the stream it was given; ablating every block passes the embedding
    output on to every read-out point."""
    adapter, _ = load_adapter(model_dirs[family])
    inputs = encode(adapter)
    container, index = adapter.block_slots[0]
    block = container[index]
    calls = []
    handle = block.register_forward_pre_hook(
        lambda m, a, kw: calls.append((a, kw)), with_kwargs=True
    )
    with torch.no_grad():
        adapter.logits(inputs)
        handle.remove()
        args, kwargs = calls[0]
        real = block(*args, **kwargs)
        skipped = SkippedBlock(block, {})(*args, **kwargs)
        with adapter.ablated(set(range(len(adapter.block_slots)))):
            streams = adapter.streams(inputs)
    assert type(skipped) is type(real)
    stream = args[0] if args else kwargs["hidden_states"]
    assert (skipped[0] if isinstance(skipped, tuple) else skipped) is stream
    assert len(streams) == len(adapter.readouts)
    for later in streams[1:]:
        torch.testing.assert_close(later, streams[0], rtol=0, atol=0)


def test_stored_weights_round_trip(model_dirs, tmp_path):
    """Loading a stored model gives the same network as building it from the same spec."""
    again = tmp_path / "gptr2"
    fetch(copy.deepcopy(TINY_SPECS["gptr2"]), again)
    a, _ = load_adapter(model_dirs["gptr2"])
    b, _ = load_adapter(again)
    for (name, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_padding_does_not_change_the_stream_of_real_tokens(model_dirs):
    adapter, _ = load_adapter(model_dirs["roberta"])
    alone = dict(adapter.tokenizer([PREMISES[1]], [HYPOTHESES[1]], return_tensors="pt"))
    with torch.no_grad():
        batch = adapter.streams(encode(adapter))
        single = adapter.streams(alone)
    length = alone["input_ids"].shape[1]
    for b, s in zip(batch, single):
        torch.testing.assert_close(b[1, :length], s[0], rtol=1e-5, atol=1e-5)


def hooked_block_outputs(model, stages, x):
    """Block outputs through forward hooks on the model's own forward, mean-pooled."""
    outputs = []
    hooks = [
        block.register_forward_hook(lambda m, a, out: outputs.append(out.mean((2, 3))))
        for stage in stages
        for block in stage
    ]
    with torch.no_grad():
        logits = model(x)
    for hook in hooks:
        hook.remove()
    return outputs, logits


def test_resnet_streams_equal_forward_hooks_on_torchvision_blocks():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    adapter = ResNetAdapter(model, preprocess={})
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        streams = adapter.streams({"pixel_values": x})
    reference, _ = hooked_block_outputs(
        model, [model.layer1, model.layer2, model.layer3, model.layer4], x
    )
    assert [(r.stage, r.block) for r in adapter.readouts] == [
        (1, 0),
        (1, 1),
        (2, 0),
        (2, 1),
        (3, 0),
        (3, 1),
        (4, 0),
        (4, 1),
    ]
    assert [r.width for r in adapter.readouts] == [64, 64, 128, 128, 256, 256, 512, 512]
    for stream, ref in zip(streams, reference, strict=True):
        torch.testing.assert_close(stream, ref, rtol=0, atol=0)


def test_bottleneck_resnet_with_other_norm_and_widths():
    torch.manual_seed(0)
    model = ResNet(
        "bottleneck",
        [1, 2, 1],
        [8, 16, 32],
        num_classes=5,
        stem="cifar",
        norm_layer=lambda c: nn.GroupNorm(2, c),
    ).eval()
    adapter = ResNetAdapter(model, preprocess={})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        streams = adapter.streams({"pixel_values": x})
    outputs, logits = hooked_block_outputs(model, [model.layer1, model.layer2, model.layer3], x)
    assert [r.width for r in adapter.readouts] == [32, 64, 64, 128]  # expansion 4
    assert [r.stage for r in adapter.readouts] == [1, 2, 2, 3]
    for stream, ref in zip(streams, outputs, strict=True):
        torch.testing.assert_close(stream, ref, rtol=0, atol=0)
    assert logits.shape == (2, 5)


@pytest.mark.parametrize(
    "block,layers,name",
    [("basic", [2, 2, 2, 2], "resnet18"), ("bottleneck", [3, 4, 6, 3], "resnet50")],
)
def test_resnet_of_torchvisions_widths_is_torchvisions_resnet(block, layers, name):
    """Built with the same seed, the same modules and weights as torchvision's own."""
    torch.manual_seed(0)
    ours = ResNet(block, layers, [64, 128, 256, 512], num_classes=10).state_dict()
    torch.manual_seed(0)
    theirs = torchvision.models.get_model(name, num_classes=10).state_dict()
    assert list(ours) == list(theirs)
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=0, atol=0, msg=key)


def test_rms_norm_resnet_has_one_scalar_gain_per_norm():
    spec = {
        "family": "resnet",
        "source": "init:",
        "num_labels": 10,
        "arch": {
            "block": "basic",
            "layers": [1, 1],
            "widths": [8, 16],
            "stem": "cifar",
            "norm": "rms",
        },
    }
    model, tokenizer = family_module("resnet").init(spec)
    assert tokenizer is None and model.config["norm"] == "rms"
    norms = [m for m in model.modules() if isinstance(m, ScalarRMSNorm)]
    assert len(norms) == 1 + 2 * 2 + 1  # bn1, bn1 and bn2 per block, the downsample's
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model.state_dict()["bn1.weight"].shape == (1,)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    rotate = lambda t: torch.einsum("bchw,cd->bdhw", t, q)  # noqa: E731
    norm = norms[0].double()
    torch.testing.assert_close(norm(rotate(x)), rotate(norm(x)))  # basis-independent


def test_resnet_carries_its_config(model_dirs, tmp_path):
    model, tokenizer = load_model(model_dirs["resnet"], "resnet")
    stored = json.loads((model_dirs["resnet"] / "config.json").read_text())
    assert tokenizer is None and model.config == stored
    write_model_files(model, None, "resnet", tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == stored
    with pytest.raises(ValueError, match="only the image_classification head"):
        load_model(model_dirs["resnet"], "resnet", head="causal_lm")


def test_stored_init_resnet_matches_hooks(model_dirs):
    adapter, manifest = load_adapter(model_dirs["resnet"])
    assert manifest["family"] == "resnet" and adapter.pooling == "spatial_mean"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        streams = adapter.streams({"pixel_values": x})
    model = adapter.model
    outputs, _ = hooked_block_outputs(model, [model.layer1, model.layer2], x)
    assert [r.name for r in adapter.readouts] == ["layer1.0", "layer2.0", "layer2.1"]
    for stream, ref in zip(streams, outputs, strict=True):
        torch.testing.assert_close(stream, ref, rtol=0, atol=0)

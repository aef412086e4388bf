"""Head and tail ablation: the definitions, exactness at the ends, and bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision
from support import ABLATION_OPTIONS
from torch import nn

from workflow_scripts.ablate import ablate, check_compatible
from workflow_scripts.data import builtin, store
from workflow_scripts.data.store import DatasetError
from workflow_scripts.models import load_adapter
from workflow_scripts.models.resnet import ResNetAdapter
from workflow_scripts.options.ablation import AblationOptions

OPTIONS = AblationOptions(**ABLATION_OPTIONS)


def encode(adapter, n=6):
    frame = builtin.generate("pairs", n, 0)
    return dict(
        adapter.tokenizer(
            list(frame["premise"]), list(frame["hypothesis"]), padding=True, return_tensors="pt"
        )
    )


@pytest.mark.parametrize("family", ["gpt2", "roberta", "bert"])
def test_ablating_nothing_gives_the_models_own_output(model_dirs, family):
    adapter, _ = load_adapter(model_dirs[family])
    inputs = encode(adapter)
    with torch.no_grad():
        own = adapter.model(**inputs).logits
        with adapter.ablated(set()):
            ablated = adapter.logits(inputs)
    torch.testing.assert_close(ablated, own, rtol=0, atol=0)


def test_ablation_is_undone_afterwards(model_dirs):
    adapter, _ = load_adapter(model_dirs["gpt2"])
    blocks = list(adapter.model.transformer.h)
    with adapter.ablated({0, 1}):
        assert not any(a is b for a, b in zip(adapter.model.transformer.h, blocks))
    assert all(a is b for a, b in zip(adapter.model.transformer.h, blocks))


def test_tail_ablation_sends_the_stream_through_the_models_own_head(model_dirs):
    """Tail at read-out k = the final norm and head applied to the stream after k blocks."""
    adapter, _ = load_adapter(model_dirs["gpt2"])
    inputs = encode(adapter)
    with torch.no_grad():
        streams = adapter.streams(inputs)
        for k in range(len(adapter.readouts)):
            with adapter.ablated(set(range(k, len(adapter.block_slots)))):
                tail = adapter.logits(inputs)
            lens = adapter.model.lm_head(adapter.final_norm(streams[k]))
            torch.testing.assert_close(tail, lens, rtol=1e-5, atol=1e-5)


def test_head_ablation_equals_zeroing_the_first_blocks_branches(model_dirs):
    """In pre-norm GPT-2 a block whose branches write zero is the identity: removing block 0
    must give what zeroing its attention and MLP output projections gives."""
    adapter, _ = load_adapter(model_dirs["gpt2"])
    zeroed, _ = load_adapter(model_dirs["gpt2"])
    zero_branches_gpt2(zeroed.model, blocks=[0])
    inputs = encode(adapter)
    with torch.no_grad():
        with adapter.ablated({0}):
            head = adapter.logits(inputs)
        reference = zeroed.logits(inputs)
        assert not torch.allclose(adapter.logits(inputs), reference)
    torch.testing.assert_close(head, reference, rtol=1e-5, atol=1e-5)


def zero_branches_gpt2(model, blocks=None):
    for i, block in enumerate(model.transformer.h):
        if blocks is not None and i not in blocks:
            continue
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)


def test_blocks_that_write_zero_are_unchanged_by_any_ablation(model_dirs, tmp_path):
    adapter, _ = load_adapter(model_dirs["gpt2"])
    zero_branches_gpt2(adapter.model)
    inputs = encode(adapter)
    with torch.no_grad():
        full = adapter.logits(inputs)
        for ablated in ({0}, {1}, {0, 1}):
            with adapter.ablated(ablated):
                torch.testing.assert_close(adapter.logits(inputs), full, rtol=0, atol=1e-6)


def resnet18_zero_branches():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=12).eval()
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            nn.init.zeros_(block.bn2.weight)
            nn.init.zeros_(block.bn2.bias)
    return model


def test_resnet_shapes_carry_through_downsampling_blocks():
    torch.manual_seed(0)
    adapter = ResNetAdapter(torchvision.models.resnet18(num_classes=12).eval(), preprocess={})
    x = {"pixel_values": torch.randn(2, 3, 64, 64)}
    n = len(adapter.block_slots)
    with torch.no_grad():
        for ablated in [{i} for i in range(n)] + [set(range(n)), {2, 4, 6}]:
            with adapter.ablated(ablated):
                assert adapter.logits(x).shape == (2, 12)
                streams = adapter.streams(x)
            assert [s.shape[1] for s in streams] == [r.width for r in adapter.readouts]


def test_resnet_blocks_that_write_zero_are_unchanged_by_any_ablation():
    adapter = ResNetAdapter(resnet18_zero_branches(), preprocess={})
    x = {"pixel_values": torch.randn(2, 3, 64, 64)}
    with torch.no_grad():
        full = adapter.logits(x)
        for ablated in ({0}, {2}, {2, 3, 4}, set(range(8))):  # 2, 4, 6 downsample
            with adapter.ablated(ablated):
                torch.testing.assert_close(adapter.logits(x), full, rtol=0, atol=1e-5)


def test_resnet_ablated_block_keeps_the_downsample_projection():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    adapter = ResNetAdapter(model, preprocess={})
    block = model.layer2[0]
    x = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        with adapter.ablated({2}):
            out = model.layer2[0](x)
        torch.testing.assert_close(out, torch.relu(block.downsample(x)))
        assert out.shape == block(x).shape == (2, 128, 8, 8)


def write(tmp_path, name, rows):
    kind = {"pairs": "pairs", "corpus": "text", "shapes": "image"}[name]
    path = tmp_path / f"{name}.parquet"
    store.write(builtin.generate(name, rows, 0), path, kind, builtin.label_names(name))
    return path


def test_classifier_accuracies_against_the_models_predictions(model_dirs, tmp_path):
    frame = ablate(model_dirs["roberta"], write(tmp_path, "pairs", 20), OPTIONS)
    adapter, _ = load_adapter(model_dirs["roberta"])
    data = builtin.generate("pairs", 20, 0)
    inputs = dict(
        adapter.tokenizer(
            list(data["premise"]), list(data["hypothesis"]), padding=True, return_tensors="pt"
        )
    )
    with torch.no_grad():
        predictions = adapter.model(**inputs).logits.argmax(-1).numpy()
    accuracy = (predictions == data["label"].to_numpy()).mean()
    full_tail = frame[(frame["direction"] == "tail") & (frame["layer"] == 2)]
    full_head = frame[(frame["direction"] == "head") & (frame["layer"] == 0)]
    assert full_tail["value"].item() == pytest.approx(accuracy)  # nothing ablated
    assert full_head["value"].item() == pytest.approx(accuracy)
    assert set(frame["metric"]) == {"top1"}  # three classes: no top-5
    assert (frame["examples"] == 20).all() and len(frame) == 3 * 2
    assert frame.groupby("direction")["blocks_ablated"].apply(list).to_dict() == {
        "head": [0, 1, 2],
        "tail": [2, 1, 0],
    }


def test_logit_lens_counts_next_token_predictions(model_dirs, tmp_path):
    frame = ablate(model_dirs["gpt2"], write(tmp_path, "corpus", 6), OPTIONS)
    adapter, _ = load_adapter(model_dirs["gpt2"])
    data = builtin.generate("corpus", 6, 0)
    correct = total = 0
    for text in data["text"]:  # one example at a time: no padding at all
        ids = adapter.tokenizer(text, truncation=True, max_length=48, return_tensors="pt")[
            "input_ids"
        ]
        with torch.no_grad():
            predicted = adapter.model(ids).logits[0, :-1].argmax(-1)
        correct += int((predicted == ids[0, 1:]).sum())
        total += ids.shape[1] - 1
    full = frame[
        (frame["direction"] == "tail") & (frame["layer"] == 2) & (frame["metric"] == "top1")
    ]
    assert full["predictions"].item() == total
    assert full["value"].item() == pytest.approx(correct / total)
    assert set(frame["metric"]) == {"top1", "top5"}


def test_resnet_ablation_end_to_end(model_dirs, tmp_path):
    frame = ablate(model_dirs["resnet"], write(tmp_path, "shapes", 16), OPTIONS)
    assert set(frame["metric"]) == {"top1", "top5"}  # ten classes
    tail = frame[(frame["direction"] == "tail") & (frame["metric"] == "top1")]
    assert tail["blocks_ablated"].tolist() == [2, 1, 0]
    assert frame[frame["direction"] == "head"]["blocks_ablated"].unique().tolist() == [1, 2, 3]


def test_a_language_model_on_labelled_pairs_is_refused_before_any_forward(
    model_dirs, tmp_path, monkeypatch
):
    adapter, _ = load_adapter(model_dirs["gpt2"])
    dataset = store.DatasetFile(write(tmp_path, "pairs", 6))
    with pytest.raises(DatasetError, match="head 'causal_lm'.*classification head"):
        check_compatible(adapter, dataset, "gpt2 on pairs")
    monkeypatch.setattr("workflow_scripts.ablate.score", lambda *a: pytest.fail("forward ran"))
    with pytest.raises(DatasetError, match="classification head"):
        ablate(model_dirs["gpt2"], tmp_path / "pairs.parquet", OPTIONS)


def test_labels_outside_the_heads_classes(model_dirs, tmp_path, monkeypatch):
    data = builtin.generate("shapes", 12, 0)
    data.loc[3, "label"] = 11  # the tiny ResNet has 10 classes
    path = tmp_path / "shapes.parquet"
    store.write(data, path, "image", None)
    monkeypatch.setattr("workflow_scripts.ablate.score", lambda *a: pytest.fail("forward ran"))
    with pytest.raises(DatasetError, match=r"label\(s\) \[11\] outside the head's 10 classes"):
        ablate(model_dirs["resnet"], path, OPTIONS)


def test_classes_in_another_order_are_matched_by_name(model_dirs, tmp_path):
    adapter, _ = load_adapter(model_dirs["roberta"])
    dataset = store.DatasetFile(write(tmp_path, "pairs", 6))
    assert check_compatible(adapter, dataset, "x") is None  # no class names: as is
    adapter.label_names = ["CONTRADICTION", "NEUTRAL", "ENTAILMENT"]
    order = check_compatible(adapter, dataset, "x")
    assert order.tolist() == [2, 1, 0]  # entailment is the model's class 2
    adapter.label_names = ["yes", "no", "maybe"]
    with pytest.raises(DatasetError, match="do not name the dataset's labels"):
        check_compatible(adapter, dataset, "x")


def test_an_imagenet_folder_of_wordnet_ids_maps_to_the_models_classes_only_whole(
    model_dirs, tmp_path
):
    """ImageNet's class folders are WordNet ids and a torchvision model's classes are names: the
    sorted ids are the class indices, so a folder of every class maps as it is, and a folder of
    some classes is refused (its labels would silently mean other classes)."""
    adapter, _ = load_adapter(model_dirs["resnet"])  # 10 classes
    adapter.label_names = [f"class {i}" for i in range(10)]
    data = builtin.generate("shapes", 10, 0)
    every = [f"n{i:08d}" for i in range(10)]
    store.write(data, tmp_path / "every.parquet", "image", every)
    assert check_compatible(adapter, store.DatasetFile(tmp_path / "every.parquet"), "x") is None
    data["label"] = data["label"] % 3
    store.write(data, tmp_path / "some.parquet", "image", every[:3])
    with pytest.raises(DatasetError, match="3 WordNet ids .* the model has 10 classes"):
        check_compatible(adapter, store.DatasetFile(tmp_path / "some.parquet"), "x")


def test_the_studys_gpt2_variant_scores_intermediate_streams_without_the_final_norm(tmp_path):
    """final_norm: false: the tail accuracy at read-out k is that of GPT-2's classifier applied
    to Hugging Face's hidden_states[k] at each example's last token (before ln_f for every k but
    the last), as the study computed it."""
    import copy

    from support import TINY_SPECS

    from workflow_scripts.fetch_model import fetch

    spec = {**copy.deepcopy(TINY_SPECS["gpt2"]), "head": "sequence_classification"}
    spec.update(num_labels=3, seed=1)
    fetch(spec, tmp_path / "gpt2-classifier")
    data_path = write(tmp_path, "pairs", 60)
    options = dataclasses.replace(OPTIONS, padding="max_length", final_norm=False)
    frame = ablate(tmp_path / "gpt2-classifier", data_path, options)

    adapter, _ = load_adapter(tmp_path / "gpt2-classifier")
    model = adapter.model
    data = builtin.generate("pairs", 60, 0)
    inputs = adapter.tokenizer(
        list(data["premise"]),
        list(data["hypothesis"]),
        padding="max_length",
        max_length=48,
        truncation=True,
        return_tensors="pt",
    )
    last = inputs["attention_mask"].sum(dim=1) - 1
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        expected = {
            k: (model.score(h[torch.arange(60), last]).argmax(-1).numpy() == data["label"]).mean()
            for k, h in enumerate(hidden)
        }
    tail = frame[frame["direction"] == "tail"].set_index("layer")["value"].to_dict()
    assert tail == pytest.approx(expected)
    # the logits themselves: the classifier on the raw stream, ln_f only after the last block
    n = len(adapter.block_slots)
    with torch.no_grad():
        for k, h in enumerate(hidden):
            with adapter.ablated(set(range(k, n)), final_norm=k == n):
                logits = adapter.logits(dict(inputs))
            torch.testing.assert_close(logits, model.score(h[torch.arange(60), last]))
            if k < n:
                with adapter.ablated(set(range(k, n))):
                    normed = adapter.logits(dict(inputs))
                assert not torch.allclose(normed, logits)


def test_the_studys_resnet_variant_passes_the_shortcut_without_relu():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    adapter = ResNetAdapter(model, preprocess={})
    x = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        with adapter.ablated({2}, shortcut_relu=False):
            downsampled = model.layer2[0](x)
        with adapter.ablated({1}, shortcut_relu=False):
            identity = model.layer1[1](x)
    torch.testing.assert_close(downsampled, model.layer2[0].downsample(x))
    assert (downsampled < 0).any()  # no ReLU after it
    assert torch.equal(identity, x)


def test_a_headless_checkpoint_is_named_as_one(model_dirs, tmp_path):
    adapter, _ = load_adapter(model_dirs["roberta"])
    adapter.head = "none"  # what a bare RobertaModel checkpoint loads as
    dataset = store.DatasetFile(write(tmp_path, "pairs", 6))
    with pytest.raises(DatasetError, match=r"checkpoint has no head \(a bare base model\)"):
        check_compatible(adapter, dataset, "roberta on pairs")

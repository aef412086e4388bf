"""The built-in datasets: deterministic, well formed, covered by the built-in vocabulary, and
learnable (a small model gets far above chance on held-out rows)."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from workflow_scripts.data import builtin
from workflow_scripts.models.builtin_tokenizer import builtin_tokenizer


@pytest.mark.parametrize("name", ["pairs", "corpus", "shapes"])
def test_same_seed_same_rows_other_seed_other_rows(name):
    a, b = builtin.generate(name, 30, seed=1), builtin.generate(name, 30, seed=1)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(builtin.generate(name, 30, seed=2))
    assert a["example_id"].tolist() == list(range(30))


def test_pairs_are_balanced_and_distinct():
    frame = builtin.generate("pairs", 300, seed=0)
    assert Counter(frame["label"]) == {0: 100, 1: 100, 2: 100}
    assert builtin.label_names("pairs") == ["entailment", "neutral", "contradiction"]
    assert frame["premise"].nunique() > 250 and (frame["premise"] != frame["hypothesis"]).all()


def test_shapes_are_32x32_rgb_with_ten_classes():
    frame = builtin.generate("shapes", 100, seed=0)
    assert Counter(frame["label"]) == {k: 10 for k in range(10)}
    for data in frame["image"]:
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.size == (32, 32) and image.mode == "RGB"


@pytest.mark.parametrize("family", ["gpt2", "roberta", "bert"])
def test_the_builtin_tokenizer_covers_the_text_sets(family):
    tokenizer = builtin_tokenizer(family)
    text = " ".join(builtin.generate("corpus", 50, 0)["text"])
    pairs = builtin.generate("pairs", 200, 0)
    text += " " + " ".join(pairs["premise"]) + " " + " ".join(pairs["hypothesis"])
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert len(ids) > 1000


def _bag_of_words(tokenizer, frame):
    vocab = len(tokenizer)

    def counts(texts):
        out = np.zeros((len(texts), vocab), np.float32)
        for i, ids in enumerate(tokenizer(list(texts), add_special_tokens=False)["input_ids"]):
            np.add.at(out[i], ids, 1.0)
        return out

    # features: hypothesis words, and words of the hypothesis missing from the premise
    hyp, prem = counts(frame["hypothesis"]), counts(frame["premise"])
    return torch.from_numpy(np.concatenate([hyp, np.maximum(hyp - prem, 0)], axis=1))


def _fit(features, labels, steps=300):
    torch.manual_seed(0)
    model = torch.nn.Linear(features.shape[1], int(labels.max()) + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(features), labels).backward()
        optimizer.step()
    return model


def test_pairs_are_learnable():
    tokenizer = builtin_tokenizer("bert")
    frame = builtin.generate("pairs", 1500, seed=0)
    features, labels = _bag_of_words(tokenizer, frame), torch.tensor(frame["label"].to_numpy())
    model = _fit(features[:1200], labels[:1200])
    accuracy = (model(features[1200:]).argmax(1) == labels[1200:]).float().mean().item()
    assert accuracy > 0.8  # chance is 1/3


def test_shapes_are_learnable():
    frame = builtin.generate("shapes", 1200, seed=0)
    images = [Image.open(io.BytesIO(data)) for data in frame["image"]]
    pixels = np.stack([np.asarray(image, np.float32) / 255 for image in images])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    x = x - x.mean(dim=(1, 2, 3), keepdim=True)  # colours are random: keep the pattern
    y = torch.tensor(frame["label"].to_numpy())
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _epoch in range(8):
        for i in torch.randperm(1000).split(50):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x[i]), y[i]).backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (net(x[1000:]).argmax(1) == y[1000:]).float().mean().item()
    assert accuracy > 0.5  # chance is 0.1


def test_corpus_is_learnable_beyond_word_frequencies():
    """A bigram model predicts held-out text far better than word frequencies alone."""
    tokenizer = builtin_tokenizer("gpt2")
    ids = tokenizer(" ".join(builtin.generate("corpus", 600, seed=0)["text"]))["input_ids"]
    train, test = np.array(ids[: len(ids) * 4 // 5]), np.array(ids[len(ids) * 4 // 5 :])
    vocab = len(tokenizer)
    unigram = np.bincount(train, minlength=vocab) + 1.0
    bigram = np.ones((vocab, vocab))
    np.add.at(bigram, (train[:-1], train[1:]), 1.0)
    uni_nll = -np.log(unigram[test[1:]] / unigram.sum()).mean()
    bi_nll = -np.log(bigram[test[:-1], test[1:]] / bigram[test[:-1]].sum(1)).mean()
    assert bi_nll < 0.7 * uni_nll

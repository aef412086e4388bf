"""The feature page: the streaming top-k of every feature against numpy, and the page the
workflow writes, opened in a headless Chromium (its feature input, buttons and #feature= links)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from support import snakemake

from workflow_scripts.activations import layer_name, open_shard
from workflow_scripts.feature_page import StreamingTopK, _whole_examples, per_example_max


def numpy_top_k(x, ids, positions, k):
    """Per feature, the k examples with the largest activation (each example at its largest
    row): values, example ids and positions [k, features], from the whole array at once."""
    examples = np.unique(ids)
    best = np.full((len(examples), x.shape[1]), -np.inf, np.float32)
    where = np.zeros((len(examples), x.shape[1]), np.int64)
    for i, example in enumerate(examples):
        rows = np.flatnonzero(ids == example)
        at = rows[np.argmax(x[rows], axis=0)]  # the first row of the max, as the stream keeps
        best[i], where[i] = x[at, np.arange(x.shape[1])], positions[at]
    order = np.argsort(-best, axis=0, kind="stable")[:k]
    return (
        np.take_along_axis(best, order, 0),
        examples[order],
        np.take_along_axis(where, order, 0),
    )


@pytest.mark.parametrize("rows_per_example", [1, 7])
def test_streaming_top_k_matches_numpy_across_blocks(rows_per_example):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, rows_per_example + 1, size=60)  # examples of 1..n rows
    ids = np.repeat(rng.permutation(1000)[:60], lengths)  # contiguous, not sorted
    positions = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    x = rng.standard_normal((len(ids), 24)).astype(np.float32)
    x[5, 3] = np.nan  # never ranks
    edges = np.unique(np.r_[0, rng.integers(1, len(ids), size=12), len(ids)])  # 13 blocks
    blocks = [(x[a:b], ids[a:b], positions[a:b]) for a, b in zip(edges[:-1], edges[1:])]
    stream = StreamingTopK(24, 8)
    pieces = list(_whole_examples(iter(blocks)))
    assert len(pieces) > 1
    examples = [set(piece_ids) for _, piece_ids, _ in pieces]
    assert sum(map(len, examples)) == len(set().union(*examples)) == 60  # none split
    for piece_x, piece_ids, piece_positions in pieces:
        stream.update(piece_x, piece_ids, piece_positions)
    got = stream.result()
    expected = numpy_top_k(np.where(np.isnan(x), -np.inf, x), ids, positions, 8)
    np.testing.assert_array_equal(got.values, expected[0])
    np.testing.assert_array_equal(got.examples, expected[1])
    np.testing.assert_array_equal(got.positions, expected[2])
    for feature in range(24):
        assert len(set(got.examples[:, feature])) == 8  # each example once
    np.testing.assert_array_equal(got.max_abs, np.nanmax(np.abs(x), axis=0))
    assert got.rows == len(ids)


def test_per_example_max_takes_the_first_row_of_ties():
    x = np.array([[1, 5], [3, 5], [3, 0], [2, 2]], np.float32)
    values, examples, rows = per_example_max(x, np.array([4, 4, 4, 9]))
    np.testing.assert_array_equal(values, [[3, 5], [2, 2]])
    np.testing.assert_array_equal(examples, [4, 9])
    np.testing.assert_array_equal(rows, [[1, 0], [3, 3]])


# --- the page the workflow writes, in a browser ---

CONFIG = {
    "models": {
        "resnet-tiny": {
            "family": "resnet",
            "source": "init:",
            "seed": 0,
            "num_labels": 10,
            "arch": {"block": "basic", "layers": [1, 2], "widths": [8, 16], "stem": "cifar"},
        },
        "gpt2-tiny": {
            "family": "gpt2",
            "source": "init:",
            "seed": 0,
            "arch": {"layers": 2, "width": 32, "heads": 2, "context": 64},
        },
    },
    "datasets": {
        "shapes": {"source": "builtin:shapes", "rows": 12, "shards": 1},
        "corpus": {"source": "builtin:corpus", "rows": 10, "shards": 2},
    },
    "analyses": [
        {"models": ["resnet-tiny"], "datasets": ["shapes"]},
        {"models": ["gpt2-tiny"], "datasets": ["corpus"]},
    ],
    # blocks of 16 rows: the text examples (up to 32 tokens) span blocks
    "extract": {"batch_size": 4, "max_tokens": 32, "chunk_rows": 8, "chunks_per_shard": 2},
    "figures": {
        "top_examples": [
            {"model": "resnet-tiny", "dataset": "shapes", "layer": 2, "page_examples": 5},
            {"model": "gpt2-tiny", "dataset": "corpus", "layer": 1},
        ]
    },
}
PAGES = {
    "resnet": "results/figures/features-resnet-tiny-shapes-layer2.html",
    "gpt2": "results/figures/features-gpt2-tiny-corpus-layer1.html",
}


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("feature-page")
    (workdir / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    result = snakemake(workdir, *PAGES.values())
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


def stored_layer(workdir, model, dataset, layer, shards):
    """A whole tiny read-out point from its shards, padding rows dropped."""
    parts = [
        open_shard(workdir / f"results/activations/{model}/{dataset}/shard-{i}.zarr")
        for i in range(shards)
    ]
    x = np.concatenate([g[layer_name(layer)][:] for g in parts]).astype(np.float32)
    ids = np.concatenate([g["example_id"][:] for g in parts])
    positions = np.concatenate([g["position"][:] for g in parts])
    keep = ~np.concatenate([g["is_padding"][:] for g in parts])
    return x[keep], ids[keep], positions[keep]


def shown(driver, feature):
    """The examples the page shows once it shows ``feature``: (value, example, position)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 10).until(
        lambda d: d.find_element(By.ID, "shown-feature").text == f"feature {feature}"
    )
    assert driver.find_element(By.ID, "feature-input").get_attribute("value") == str(feature)
    return [
        (
            float(e.get_attribute("data-value")),
            int(e.get_attribute("data-example")),
            int(e.get_attribute("data-position")),
        )
        for e in driver.find_elements(By.CSS_SELECTOR, "#examples .example")
    ]


def check_against_the_shards(examples, x, ids, positions, feature, k):
    """The page's examples of ``feature`` are the top k by numpy, each at a row that holds it."""
    values = [value for value, _, _ in examples]
    assert len(examples) == k
    best = {}
    for value, example in zip(x[:, feature], ids):
        best[example] = max(best.get(example, -np.inf), value)
    np.testing.assert_array_equal(values, sorted(best.values(), reverse=True)[:k])
    assert len({example for _, example, _ in examples}) == k  # each example once
    for value, example, position in examples:
        row = np.flatnonzero((ids == example) & (positions == position))
        assert len(row) == 1 and x[row[0], feature] == value == best[example]


@pytest.mark.workflow
def test_the_image_page_in_a_browser(pages, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    page = pages / PAGES["resnet"]
    html = page.read_text()
    assert "<script src" not in html and "http://" not in html and "https://" not in html
    x, ids, positions = stored_layer(pages, "resnet-tiny", "shapes", 2, 1)
    browser.get(page.as_uri() + "#feature=3")
    check_against_the_shards(shown(browser, 3), x, ids, positions, 3, k=5)
    images = browser.find_elements(By.CSS_SELECTOR, "#examples img")
    assert len(images) == 5
    assert all(i.get_attribute("src").startswith("data:image/jpeg;base64,") for i in images)
    weights = browser.find_elements(By.CSS_SELECTOR, "#weights tr.weight")
    assert len(weights) == 10  # the last block feeds the classifier: every class
    assert weights[0].find_element(By.CSS_SELECTOR, "td.name").text == "circle"

    field = browser.find_element(By.ID, "feature-input")
    field.clear()
    field.send_keys("11", Keys.ENTER)
    check_against_the_shards(shown(browser, 11), x, ids, positions, 11, k=5)
    assert browser.execute_script("return location.hash") == "#feature=11"
    browser.find_element(By.ID, "next").click()
    check_against_the_shards(shown(browser, 12), x, ids, positions, 12, k=5)
    assert browser.execute_script("return location.hash") == "#feature=12"
    outlying = browser.find_elements(By.CSS_SELECTOR, "#outlying button")
    assert len(outlying) == 16  # every feature of this 16-wide layer, largest |x| first
    top = np.argsort(-np.abs(x).max(axis=0), kind="stable")
    assert int(outlying[0].get_attribute("data-feature")) == top[0]
    outlying[1].click()
    check_against_the_shards(shown(browser, top[1]), x, ids, positions, top[1], k=5)


@pytest.mark.workflow
def test_the_text_page_in_a_browser(pages, browser):
    from selenium.webdriver.common.by import By

    page = pages / PAGES["gpt2"]
    x, ids, positions = stored_layer(pages, "gpt2-tiny", "corpus", 1, 2)
    browser.get(page.as_uri() + "#feature=3")
    check_against_the_shards(shown(browser, 3), x, ids, positions, 3, k=8)
    marks = browser.find_elements(By.CSS_SELECTOR, "#examples .example mark")
    assert len(marks) == 8 and all(m.text for m in marks)  # the token, highlighted
    assert len(browser.find_elements(By.CSS_SELECTOR, "#weights tr.weight")) == 8  # tokens
    browser.find_element(By.ID, "prev").click()
    check_against_the_shards(shown(browser, 2), x, ids, positions, 2, k=8)
    assert browser.execute_script("return location.hash") == "#feature=2"
    browser.execute_script("location.hash = 'feature=30'")  # a link within the page
    check_against_the_shards(shown(browser, 30), x, ids, positions, 30, k=8)

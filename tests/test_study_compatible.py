"""study_compatible: true gives the study's numbers. A tiny model of every family runs through
the workflow, and its merged statistics are compared with the study's definitions computed here
in numpy float64: on Hugging Face's own hidden_states for the transformers (padded to 128
tokens, padding counted, GPT-2's and the decoder's last after the final norm), and on the stored
stream for the ResNet."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from support import load_config, snakemake

from workflow_scripts.activations import layer_name, open_shard
from workflow_scripts.data import store
from workflow_scripts.models import load_model
from workflow_scripts.models.hooked import load_tokenizer

SEED = 0  # stats.seed


def study_statistics(layers: list[np.ndarray], thresholds: list[float]) -> pd.DataFrame:
    """The study's definitions, per layer of ``[examples, tokens, width]`` float64 activations:
    kurtosis of each token's features, averaged over each example's tokens, then over examples;
    the same after one Haar rotation per layer; RMS the root of the mean over examples of each
    example's mean x^2; the fraction of features with any value over a threshold."""
    records = []
    for layer, x in enumerate(layers):
        width = x.shape[-1]
        rng = np.random.default_rng([SEED, layer, 0])
        q, r = np.linalg.qr(rng.standard_normal((width, width)))
        rotation = (q * np.sign(np.diag(r))).astype(np.float32).astype(np.float64)

        def kurtosis(values):
            centred = values - values.mean(axis=-1, keepdims=True)
            m2 = (centred**2).mean(axis=-1)
            return ((centred**4).mean(axis=-1) / m2**2).mean(axis=1).mean()

        values = {
            ("kurtosis", "standard basis, example mean"): kurtosis(x),
            ("rotated_kurtosis", "mean of 1 rotation(s), example mean"): kurtosis(x @ rotation),
            ("rms", "root of the example mean square"): np.sqrt((x**2).mean(axis=(1, 2)).mean()),
        }
        for t in thresholds:
            values["outlier_fraction", f"signed x > {t:g}"] = (x > t).any(axis=(0, 1)).mean()
        records += [
            {"layer": layer, "metric": m, "setting": s, "expected": v}
            for (m, s), v in values.items()
        ]
    return pd.DataFrame(records)


def hf_hidden_states(model_dir, family: str, data: pd.DataFrame) -> list[np.ndarray]:
    """Hugging Face's hidden_states of the pairs, tokenized as the study did."""
    model, _ = load_model(model_dir, family)
    tokenizer = load_tokenizer(model_dir)
    inputs = tokenizer(
        list(data["premise"]),
        list(data["hypothesis"]),
        padding="max_length",
        max_length=128,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    assert hidden[0].shape[1] == 128
    return [h.double().numpy() for h in hidden]


def stored_stream(shard, readouts: int) -> list[np.ndarray]:
    group = open_shard(shard)
    return [group[layer_name(k)][:].astype(np.float64)[:, None, :] for k in range(readouts)]


@pytest.mark.workflow
def test_every_family_under_study_compatible_gives_the_studys_numbers(tmp_path):
    config = load_config("study_tiny")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    pairs = [(m, d) for a in config["analyses"] for m in a["models"] for d in a["datasets"]]
    result = snakemake(tmp_path, *(f"results/stats/{m}/{d}.parquet" for m, d in pairs))
    assert result.returncode == 0, result.stderr[-4000:]
    data = store.read(tmp_path / "results/data/pairs.parquet")[0]
    thresholds = config["stats"]["thresholds"]["gpt2"]
    for model, dataset in pairs:
        family = config["models"][model]["family"]
        if family == "resnet":
            layers = stored_stream(tmp_path / "results/activations/resnet/shapes/shard-0.zarr", 3)
        else:
            layers = hf_hidden_states(tmp_path / f"results/models/{model}", family, data)
        expected = study_statistics(layers, thresholds)
        merged = pd.read_parquet(tmp_path / f"results/stats/{model}/{dataset}.parquet")
        compared = expected.merge(merged, on=["layer", "metric", "setting"], how="left")
        assert compared["value"].notna().all(), (model, compared[compared["value"].isna()])
        assert (compared["rows"] == len(layers[0]) * layers[0].shape[1]).all()
        np.testing.assert_allclose(
            compared["value"], compared["expected"], rtol=1e-6, atol=1e-12, err_msg=model
        )
        outliers = compared[compared["metric"] == "outlier_fraction"]["expected"]
        assert 0 < outliers.max() and outliers.min() < 1  # thresholds that tell features apart

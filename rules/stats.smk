# layer_stats: results/stats/{model}/{dataset}/layer-{layer}.parquet, one job per read-out point,
# reading every shard; merge_stats: results/stats/{model}/{dataset}.parquet.


rule layer_stats:
    input:
        shards=activation_shards,
    output:
        out="results/stats/{model}/{dataset}/layer-{layer}.parquet",
    log:
        "results/logs/layer_stats/{model}/{dataset}/layer-{layer}.log",
    conda:
        "../envs/workflow.yaml"
    threads: 1
    resources:
        gpu=stats_gpus,
    params:
        layer="{layer}",
        thresholds=thresholds,
        options=stats_options,
        model="{model}",
        dataset="{dataset}",
        basis_seed=optimizer_basis_seed,
        code=stage_code("layer_stats"),
    script:
        "../scripts/stage.py"


rule merge_stats:
    input:
        layers=layer_stats_files,
    output:
        out="results/stats/{model}/{dataset}.parquet",
    log:
        "results/logs/merge_stats/{model}/{dataset}.log",
    conda:
        "../envs/workflow.yaml"
    params:
        code=stage_code("merge_stats"),
    script:
        "../scripts/stage.py"

# layer_stats: results/stats/{model}/{dataset}/layer-{layer}.parquet, one job per read-out point,
# reading every shard; merge_stats: results/stats/{model}/{dataset}.parquet.


rule layer_stats:
    input:
        shards=activation_shards,
        code=code_files("workflow_scripts.layer_stats"),
    output:
        "results/stats/{model}/{dataset}/layer-{layer}.parquet",
    log:
        "results/logs/layer_stats/{model}/{dataset}/layer-{layer}.log",
    cache: True
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
    shell:
        "python -m workflow_scripts.layer_stats --shards {input.shards:q} --layer {params.layer} "
        "--thresholds {params.thresholds} --options {params.options:q} --model {params.model:q} "
        "--dataset {params.dataset:q} --threads {threads} --out {output:q} 2> {log:q}"


rule merge_stats:
    input:
        layers=layer_stats_files,
        code=code_files("workflow_scripts.merge_stats"),
    output:
        "results/stats/{model}/{dataset}.parquet",
    log:
        "results/logs/merge_stats/{model}/{dataset}.log",
    cache: True
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow_scripts.merge_stats --layers {input.layers:q} --out {output:q} "
        "2> {log:q}"

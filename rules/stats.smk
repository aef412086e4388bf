# layer_stats: results/stats/{model}/{dataset}/layer-{layer}.parquet, one job per read-out point,
# reading every shard; merge_stats: results/stats/{model}/{dataset}.parquet.


rule layer_stats:
    input:
        shards=lambda wildcards: activation_shards(wildcards.model, wildcards.dataset),
        code=code_files("workflow_scripts.layer_stats"),
    output:
        "results/stats/{model}/{dataset}/layer-{layer}.parquet",
    params:
        layer=lambda wildcards: int(wildcards.layer),
        thresholds=lambda wildcards: thresholds(config, wildcards.model),
        options=lambda wildcards: json.dumps(stats_options(), sort_keys=True),
        model=lambda wildcards: wildcards.model,
        dataset=lambda wildcards: wildcards.dataset,
    cache: True
    log:
        "results/logs/layer_stats/{model}/{dataset}/layer-{layer}.log",
    threads: 1
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow_scripts.layer_stats --shards {input.shards:q} --layer {params.layer} "
        "--thresholds {params.thresholds} --options {params.options:q} --model {params.model:q} "
        "--dataset {params.dataset:q} --threads {threads} --out {output:q} 2> {log:q}"


rule merge_stats:
    input:
        layers=lambda wildcards: layer_stats_files(wildcards.model, wildcards.dataset),
        code=code_files("workflow_scripts.merge_stats"),
    output:
        "results/stats/{model}/{dataset}.parquet",
    cache: True
    log:
        "results/logs/merge_stats/{model}/{dataset}.log",
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow_scripts.merge_stats --layers {input.layers:q} --out {output:q} "
        "2> {log:q}"

# extract: results/activations/{model}/{dataset}/shard-{shard}.zarr, one job per shard.


rule extract:
    input:
        model="results/models/{model}",
        data="results/data/{dataset}.parquet",
        code=model_code_files("workflow_scripts.extract"),
    output:
        directory("results/activations/{model}/{dataset}/shard-{shard}.zarr"),
    log:
        "results/logs/extract/{model}/{dataset}/shard-{shard}.log",
    cache: True
    conda:
        "../envs/workflow.yaml"
    threads: 1
    resources:
        mem_mb=job_resource("extract", "mem_mb"),
        runtime=job_resource("extract", "runtime"),
    params:
        shard="{shard}",
        shards=shard_count,
        options=extraction_options,
        readouts=readout_count,
    shell:
        "python -m workflow_scripts.extract --model {input.model:q} --data {input.data:q} "
        "--shard {params.shard} --shards {params.shards} --options {params.options:q} "
        "--readouts {params.readouts} --code {input.code:q} --threads {threads} --out {output:q} "
        "2> {log:q}"

# extract: results/activations/{model}/{dataset}/shard-{shard}.zarr, one job per shard.


rule extract:
    input:
        model="results/models/{model}",
        data="results/data/{dataset}.parquet",
    output:
        out=directory("results/activations/{model}/{dataset}/shard-{shard}.zarr"),
    log:
        "results/logs/extract/{model}/{dataset}/shard-{shard}.log",
    conda:
        "../envs/workflow.yaml"
    threads: 1
    resources:
        mem_mb=job_resource("extract", "mem_mb"),
        runtime=job_resource("extract", "runtime"),
        gpu=job_resource("extract", "gpu"),
    params:
        shard="{shard}",
        shards=shard_count,
        options=extraction_options,
        dtype=model_dtype,
        placement=model_placement,
        readouts=readout_count,
        code=model_stage_code("extract"),
    script:
        "../scripts/stage.py"

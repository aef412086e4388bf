# ablate: results/ablation/{model}/{dataset}.parquet, accuracy under head and tail ablation.
rule ablate:
    input:
        model="results/models/{model}",
        data="results/data/{dataset}.parquet",
    output:
        out="results/ablation/{model}/{dataset}.parquet",
    log:
        "results/logs/ablate/{model}/{dataset}.log",
    conda:
        "../envs/workflow.yaml"
    threads: 1
    resources:
        mem_mb=job_resource("ablate", "mem_mb"),
        runtime=job_resource("ablate", "runtime"),
        gpu=job_resource("ablate", "gpu"),
    params:
        options=ablation_options,
        dtype=model_dtype,
        placement=model_placement,
        model_name="{model}",
        dataset_name="{dataset}",
        code=model_stage_code("ablate"),
    script:
        "../scripts/stage.py"

# ablate: results/ablation/{model}/{dataset}.parquet, accuracy under head and tail ablation.


rule ablate:
    input:
        model="results/models/{model}",
        data="results/data/{dataset}.parquet",
        code=model_code_files("workflow_scripts.ablate"),
    output:
        "results/ablation/{model}/{dataset}.parquet",
    log:
        "results/logs/ablate/{model}/{dataset}.log",
    cache: True
    conda:
        "../envs/workflow.yaml"
    threads: 1
    resources:
        mem_mb=job_resource("ablate", "mem_mb"),
        runtime=job_resource("ablate", "runtime"),
    params:
        options=ablation_options,
        model="{model}",
        dataset="{dataset}",
    shell:
        "python -m workflow_scripts.ablate --model {input.model:q} --data {input.data:q} "
        "--options {params.options:q} --model-name {params.model:q} "
        "--dataset-name {params.dataset:q} --threads {threads} --out {output:q} 2> {log:q}"

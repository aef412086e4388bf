# train: results/models/{model}/ for models whose source is train:<run> (the run of the same
# name), with results/train/{model}/metrics.parquet and its loss curve.


rule train:
    input:
        data=run_data,
        base=run_base,
        tokenizer=run_tokenizer,
        code=model_code_files("workflow_scripts.train"),
    output:
        model=directory("results/models/{model}"),
        metrics="results/train/{model}/metrics.parquet",
        plot="results/train/{model}/loss.png",
    log:
        "results/logs/train/{model}.log",
    wildcard_constraints:
        model=trained_model_names(),
    cache: True
    conda:
        "../envs/workflow.yaml"
    threads: 8
    resources:
        mem_mb=job_resource("train", "mem_mb"),
        runtime=job_resource("train", "runtime"),
    params:
        spec=run_settings,
        name="{model}",
        checkpoint="results/train/{model}/checkpoint.pt",
    shell:
        "python -m workflow_scripts.train --name {params.name:q} --spec {params.spec:q} "
        "--data {input.data:q} --base {input.base:q} --tokenizer {input.tokenizer:q} "
        "--checkpoint {params.checkpoint:q} --metrics {output.metrics:q} --plot {output.plot:q} "
        "--threads {threads} --out {output.model:q} 2> {log:q}"

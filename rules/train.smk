# train: results/models/{model}/ for models whose source is train:<run> (the run of the same
# name), with results/train/{model}/metrics.parquet and its loss curve.


rule train:
    input:
        data=lambda wildcards: f"results/data/{training_run(wildcards.model)['dataset']}.parquet",
        base=lambda wildcards: run_model_dir(wildcards.model, "base"),
        tokenizer=lambda wildcards: run_model_dir(wildcards.model, "tokenizer"),
        code=model_code_files("workflow_scripts.train"),
    output:
        model=directory("results/models/{model}"),
        metrics="results/train/{model}/metrics.parquet",
        plot="results/train/{model}/loss.png",
    wildcard_constraints:
        model=names_pattern(trained_models(config)),
    params:
        spec=lambda wildcards: json.dumps(training_run(wildcards.model), sort_keys=True),
        name=lambda wildcards: wildcards.model,
        models=lambda wildcards: " ".join(
            f"--{key} {shlex.quote(d)}"
            for key in ("base", "tokenizer")
            for d in run_model_dir(wildcards.model, key)
        ),
        checkpoint=lambda wildcards: f"results/train/{wildcards.model}/checkpoint.pt",
    resources:
        mem_mb=job_resource("train", "mem_mb"),
        runtime=job_resource("train", "runtime"),
    cache: True
    log:
        "results/logs/train/{model}.log",
    threads: 2
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow_scripts.train --name {params.name:q} --spec {params.spec:q} "
        "--data {input.data:q} {params.models} --checkpoint {params.checkpoint:q} "
        "--metrics {output.metrics:q} --plot {output.plot:q} --threads {threads} "
        "--out {output.model:q} 2> {log:q}"

# train: results/models/{model}/ for models whose source is train:<run> (the run of the same
# name), with results/train/{model}/metrics.parquet and its loss curve.


rule train:
    input:
        data=run_data,
        base=run_base,
        tokenizer=run_tokenizer,
    output:
        out=directory("results/models/{model}"),
        metrics="results/train/{model}/metrics.parquet",
        plot="results/train/{model}/loss.png",
    log:
        "results/logs/train/{model}.log",
    wildcard_constraints:
        model=trained_model_names(),
    conda:
        "../envs/workflow.yaml"
    threads: 8
    resources:
        mem_mb=job_resource("train", "mem_mb"),
        runtime=job_resource("train", "runtime"),
        gpu=job_resource("train", "gpu"),
    params:
        spec=run_settings,
        model="{model}",
        checkpoint="results/train/{model}/checkpoint.pt",
        code=model_stage_code("train"),
    script:
        "../scripts/stage.py"

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
        snapshots=directory("results/train/{model}/snapshots"),
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


# snapshot: results/models/{run}@{step}, the model of a run at one of the steps its snapshots
# name, kept by its train job; a model of its own for every analysis. A local copy.
rule snapshot:
    input:
        snapshots="results/train/{run}/snapshots",
    output:
        out=directory("results/models/{run}@{step}"),
    log:
        "results/logs/snapshot/{run}@{step}.log",
    wildcard_constraints:
        run=names_pattern(study.runs),
        step=r"\d+",
    localrule: True
    conda:
        "../envs/workflow.yaml"
    params:
        step="{step}",
        code=stage_code("snapshot"),
    script:
        "../scripts/stage.py"

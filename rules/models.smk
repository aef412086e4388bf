# fetch_model: results/models/{model}/ in the stored layout (weights, config, manifest.json).
# A localrule: cluster compute nodes often have no internet.


rule fetch_model:
    input:
        source_files=local_model_files,
    output:
        out=directory("results/models/{model}"),
    log:
        "results/logs/fetch_model/{model}.log",
    wildcard_constraints:
        model=fetched_model_names(),
    localrule: True
    conda:
        "../envs/workflow.yaml"
    params:
        spec=model_spec,
        code=model_stage_code("fetch_model"),
    script:
        "../scripts/stage.py"

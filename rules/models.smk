# fetch_model: results/models/{model}/ in the stored layout (weights, config, manifest.json).
# A localrule: cluster compute nodes often have no internet.


rule fetch_model:
    input:
        code=model_code_files("workflow_scripts.fetch_model"),
        local=local_model_files,
    output:
        directory("results/models/{model}"),
    log:
        "results/logs/fetch_model/{model}.log",
    wildcard_constraints:
        model=fetched_model_names(),
    cache: True
    localrule: True
    conda:
        "../envs/workflow.yaml"
    params:
        spec=model_spec,
    shell:
        "python -m workflow_scripts.fetch_model --spec {params.spec:q} --out {output:q} "
        "2> {log:q}"

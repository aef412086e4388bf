# prepare_data: results/data/{dataset}.parquet from any dataset source.


rule prepare_data:
    input:
        code=code_files("workflow_scripts.prepare_data"),
        source=dataset_source_files,
    output:
        "results/data/{dataset}.parquet",
    log:
        "results/logs/prepare_data/{dataset}.log",
    cache: True
    conda:
        "../envs/workflow.yaml"
    params:
        spec=dataset_spec,
        name="{dataset}",
    shell:
        "python -m workflow_scripts.prepare_data --spec {params.spec:q} --name {params.name:q} "
        "--out {output:q} 2> {log:q}"

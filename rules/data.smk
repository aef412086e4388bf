# prepare_data: results/data/{dataset}.parquet from any dataset source; tokenize: a text dataset
# through a tokenizer, as the flat token file a language model trains on.


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
    threads: 8
    resources:
        mem_mb=4000,
    params:
        spec=dataset_spec,
        name="{dataset}",
    shell:
        "python -m workflow_scripts.prepare_data --spec {params.spec:q} --name {params.name:q} "
        "--threads {threads} --out {output:q} 2> {log:q}"


rule tokenize:
    input:
        data="results/data/{dataset}.parquet",
        tokenizer=tokenizer_model,
        code=code_files("workflow_scripts.tokenize"),
    output:
        "results/tokens/{dataset}/{tokenizer}.npy",
    log:
        "results/logs/tokenize/{dataset}/{tokenizer}.log",
    cache: True
    conda:
        "../envs/workflow.yaml"
    threads: 8
    resources:
        mem_mb=4000,
    params:
        tokenizer=tokenizer_argument,
    shell:
        "python -m workflow_scripts.tokenize --data {input.data:q} {params.tokenizer} "
        "--threads {threads} --out {output:q} 2> {log:q}"

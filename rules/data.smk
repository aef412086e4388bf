# prepare_data: results/data/{dataset}.parquet from any dataset source; tokenize: a text dataset
# through a tokenizer, as the flat token file a language model trains on.


rule prepare_data:
    input:
        source_files=dataset_source_files,
    output:
        out="results/data/{dataset}.parquet",
    log:
        "results/logs/prepare_data/{dataset}.log",
    conda:
        "../envs/workflow.yaml"
    threads: 8
    resources:
        mem_mb=4000,
    params:
        spec=dataset_spec,
        name="{dataset}",
        code=stage_code("prepare_data"),
    script:
        "../scripts/stage.py"


rule tokenize:
    input:
        data="results/data/{dataset}.parquet",
        model=tokenizer_model,
    output:
        out="results/tokens/{dataset}/{tokenizer}.npy",
    log:
        "results/logs/tokenize/{dataset}/{tokenizer}.log",
    conda:
        "../envs/workflow.yaml"
    threads: 8
    resources:
        mem_mb=4000,
    params:
        builtin=builtin_tokenizer,
        code=stage_code("tokenize"),
    script:
        "../scripts/stage.py"

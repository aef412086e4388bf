# One rule per figure: results/figures/{figure}-{group}.png and .pdf, drawn for the groups of
# models in figures.groups; the training loss curves as results/figures/training.png and .pdf.


for figure_name, figure_inputs in (
    ("outliers", stats_inputs),
    ("kurtosis", stats_inputs),
    ("regimes", stats_inputs),
    ("ablation", ablation_inputs),
):

    rule:
        name:
            f"figure_{figure_name}"
        input:
            data=figure_inputs,
            code=code_files("workflow_scripts.figures"),
        output:
            png=report(
                f"results/figures/{figure_name}-{{group}}.png",
                caption=f"../report/{figure_name}.rst",
                category=figure_name,
            ),
            pdf=f"results/figures/{figure_name}-{{group}}.pdf",
        params:
            figure=figure_name,
            group=lambda wildcards: wildcards.group,
            # the order of the inputs is the order of the legend; the cache does not see it
            order=lambda wildcards, input: list(input.data),
            dpi=config["figures"]["dpi"],
        cache: True
        log:
            f"results/logs/figures/{figure_name}-{{group}}.log",
        conda:
            "../envs/workflow.yaml"
        shell:
            "python -m workflow_scripts.figures {params.figure} --group {params.group:q} "
            "--inputs {input.data:q} --dpi {params.dpi} --out {output.png:q} {output.pdf:q} "
            "2> {log:q}"


rule figure_training:
    input:
        metrics=lambda wildcards: [
            f"results/train/{run}/metrics.parquet" for run in config["training"]["runs"]
        ],
        code=code_files("workflow_scripts.figures"),
    output:
        png=report(
            "results/figures/training.png",
            caption="../report/training.rst",
            category="training",
        ),
        pdf="results/figures/training.pdf",
    params:
        order=lambda wildcards, input: list(input.metrics),
        dpi=config["figures"]["dpi"],
    cache: True
    log:
        "results/logs/figures/training.log",
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow_scripts.figures training --group runs --inputs {input.metrics:q} "
        "--dpi {params.dpi} --out {output.png:q} {output.pdf:q} 2> {log:q}"


rule figure_top_examples:
    input:
        model="results/models/{model}",
        data="results/data/{dataset}.parquet",
        shards=lambda wildcards: activation_shards(wildcards.model, wildcards.dataset),
        stats="results/stats/{model}/{dataset}/layer-{layer}.parquet",
        code=model_code_files("workflow_scripts.top_examples"),
    output:
        png=report(
            "results/figures/top-examples-{model}-{dataset}-layer{layer}.png",
            caption="../report/top_examples.rst",
            category="top examples",
        ),
        pdf="results/figures/top-examples-{model}-{dataset}-layer{layer}.pdf",
    wildcard_constraints:
        # names hold dashes: only configured names, so roberta-base + mnli-matched is not
        # read as roberta-base-mnli + matched
        model=names_pattern(sorted(config["models"])),
        dataset=names_pattern(sorted(config["datasets"])),
    params:
        options=top_examples_options,
        title=lambda wildcards: f"{wildcards.model} on {wildcards.dataset}, read-out point {wildcards.layer}",
    cache: True
    log:
        "results/logs/figures/top-examples-{model}-{dataset}-layer{layer}.log",
    conda:
        "../envs/workflow.yaml"
    shell:
        "python -m workflow_scripts.top_examples --model {input.model:q} --data {input.data:q} "
        "--shards {input.shards:q} --stats {input.stats:q} --options {params.options:q} "
        "--title {params.title:q} --out {output.png:q} {output.pdf:q} 2> {log:q}"


for table_name, table_inputs in (("statistics", all_stats), ("ablation", all_ablations)):

    rule:
        name:
            f"table_{table_name}"
        input:
            data=lambda wildcards, inputs=table_inputs: inputs(),
            code=code_files("workflow_scripts.tables"),
        output:
            report(
                f"results/tables/{table_name}.csv",
                caption=f"../report/table_{table_name}.rst",
                category="tables",
            ),
        params:
            order=lambda wildcards, input: list(input.data),
        cache: True
        log:
            f"results/logs/tables/{table_name}.log",
        conda:
            "../envs/workflow.yaml"
        shell:
            "python -m workflow_scripts.tables --inputs {input.data:q} --out {output:q} 2> {log:q}"

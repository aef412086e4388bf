# One rule per figure: results/figures/{figure}-{group}.png and .pdf, drawn for the groups of
# models in figures.groups; the training loss curves as results/figures/training.png and .pdf;
# the top-example figures and feature pages; the statistics and ablation tables of the report.


for figure_name, figure_inputs in (
    ("outliers", group_stats),
    ("kurtosis", group_stats),
    ("regimes", group_stats),
    ("ablation", group_ablations),
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
        log:
            f"results/logs/figures/{figure_name}-{{group}}.log",
        cache: True
        conda:
            "../envs/workflow.yaml"
        params:
            figure=figure_name,
            group="{group}",
            order=input_order,
            dpi=study.dpi,
            facts=figure_facts,
        shell:
            "python -m workflow_scripts.figures {params.figure} --group {params.group:q} "
            "--inputs {input.data:q} --dpi {params.dpi} --out {output.png:q} {output.pdf:q} "
            "2> {log:q}"


rule figure_training:
    input:
        data=training_metrics,
        code=code_files("workflow_scripts.figures"),
    output:
        png=report(
            "results/figures/training.png",
            caption="../report/training.rst",
            category="training",
        ),
        pdf="results/figures/training.pdf",
    log:
        "results/logs/figures/training.log",
    cache: True
    conda:
        "../envs/workflow.yaml"
    params:
        order=input_order,
        dpi=study.dpi,
        runs=training_runs,
    shell:
        "python -m workflow_scripts.figures training --group runs --inputs {input.data:q} "
        "--dpi {params.dpi} --out {output.png:q} {output.pdf:q} 2> {log:q}"


rule figure_top_examples:
    input:
        model="results/models/{model}",
        data="results/data/{dataset}.parquet",
        shards=activation_shards,
        stats="results/stats/{model}/{dataset}/layer-{layer}.parquet",
        code=model_code_files("workflow_scripts.top_examples"),
    output:
        png=report(
            "results/figures/top-examples-{model}-{dataset}-layer{layer}.png",
            caption="../report/top_examples.rst",
            category="top examples",
        ),
        pdf="results/figures/top-examples-{model}-{dataset}-layer{layer}.pdf",
    log:
        "results/logs/figures/top-examples-{model}-{dataset}-layer{layer}.log",
    wildcard_constraints:
        # names hold dashes: only configured names, so roberta-base + mnli-matched is not
        # read as roberta-base-mnli + matched
        model=names_pattern(study.models),
        dataset=names_pattern(study.datasets),
    cache: True
    conda:
        "../envs/workflow.yaml"
    params:
        options=top_examples_options,
        title="{model} on {dataset}, read-out point {layer}",
    shell:
        "python -m workflow_scripts.top_examples --model {input.model:q} --data {input.data:q} "
        "--shards {input.shards:q} --stats {input.stats:q} --options {params.options:q} "
        "--title {params.title:q} --out {output.png:q} {output.pdf:q} 2> {log:q}"


# A page per top-examples entry on which a reader picks any feature of the read-out point: its top
# examples and its weights to the outputs, one self-contained HTML file.
rule feature_page:
    input:
        model="results/models/{model}",
        data="results/data/{dataset}.parquet",
        shards=activation_shards,
        code=model_code_files("workflow_scripts.feature_page"),
    output:
        report(
            "results/figures/features-{model}-{dataset}-layer{layer}.html",
            caption="../report/feature_page.rst",
            category="top examples",
        ),
    log:
        "results/logs/figures/features-{model}-{dataset}-layer{layer}.log",
    wildcard_constraints:
        model=names_pattern(study.models),
        dataset=names_pattern(study.datasets),
    cache: True
    conda:
        "../envs/workflow.yaml"
    params:
        options=feature_page_options,
        title="{model} on {dataset}, read-out point {layer}: the top examples of every feature",
    shell:
        "python -m workflow_scripts.feature_page --model {input.model:q} --data {input.data:q} "
        "--shards {input.shards:q} --options {params.options:q} --title {params.title:q} "
        "--out {output:q} 2> {log:q}"


rule table_statistics:
    input:
        data=all_stats,
        code=code_files("workflow_scripts.report_tables"),
    output:
        report(
            "results/tables/statistics.csv",
            caption="../report/table_statistics.rst",
            category="tables",
        ),
    log:
        "results/logs/tables/statistics.log",
    cache: True
    conda:
        "../envs/workflow.yaml"
    params:
        order=input_order,
    shell:
        "python -m workflow_scripts.report_tables --inputs {input.data:q} --out {output:q} "
        "2> {log:q}"


use rule table_statistics as table_ablation with:
    input:
        data=all_ablations,
        code=code_files("workflow_scripts.report_tables"),
    output:
        report(
            "results/tables/ablation.csv",
            caption="../report/table_ablation.rst",
            category="tables",
        ),
    log:
        "results/logs/tables/ablation.log",
    cache: True  # not inherited by `use rule`

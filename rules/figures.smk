# One rule per figure kind of the registry (workflow_scripts/figure_registry.py), named
# figure_<kind>: a group figure as results/figures/<kind>-{group}.png and .pdf, for each group of
# figures.groups that lists it; a training figure as results/figures/<kind>.png and .pdf, over
# every training run. Then the top-example figures and feature pages, and the statistics and
# ablation tables of the report.


for figure in FIGURES.values():
    if not figure.per_group:
        continue

    rule:
        name:
            figure.rule
        input:
            data=FIGURE_INPUTS[figure.inputs],
        output:
            png=report(
                f"results/figures/{figure.name}-{{group}}.png",
                caption="../report/figure.rst",
                category=figure.name,
            ),
            pdf=f"results/figures/{figure.name}-{{group}}.pdf",
        log:
            f"results/logs/figures/{figure.name}-{{group}}.log",
        wildcard_constraints:
            group=names_pattern(study.figure_groups),
        conda:
            "../envs/workflow.yaml"
        params:
            figure=figure.name,
            group="{group}",
            regimes=group_regimes,
            steps=group_steps,
            order=input_order,
            dpi=study.dpi,
            caption=figure_caption(figure),
            code=stage_code(figure.rule),
        script:
            "../scripts/stage.py"


for figure in FIGURES.values():
    if figure.per_group:
        continue

    rule:
        name:
            figure.rule
        input:
            data=FIGURE_INPUTS[figure.inputs],
        output:
            png=report(
                f"results/figures/{figure.name}.png",
                caption="../report/figure.rst",
                category=figure.name,
            ),
            pdf=f"results/figures/{figure.name}.pdf",
        log:
            f"results/logs/figures/{figure.name}.log",
        conda:
            "../envs/workflow.yaml"
        params:
            figure=figure.name,
            group="runs",
            order=input_order,
            dpi=study.dpi,
            caption=figure_caption(figure),
            code=stage_code(figure.rule),
        script:
            "../scripts/stage.py"


rule figure_top_examples:
    input:
        model="results/models/{model}",
        data="results/data/{dataset}.parquet",
        shards=activation_shards,
        stats="results/stats/{model}/{dataset}/layer-{layer}.parquet",
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
    conda:
        "../envs/workflow.yaml"
    params:
        options=top_examples_options,
        title="{model} on {dataset}, read-out point {layer}",
        dtype=model_dtype,
        placement=model_placement,
        code=model_stage_code("figure_top_examples"),
    script:
        "../scripts/stage.py"


# A page per top-examples entry on which a reader picks any feature of the read-out point: its top
# examples and its weights to the outputs, one self-contained HTML file.
rule feature_page:
    input:
        model="results/models/{model}",
        data="results/data/{dataset}.parquet",
        shards=activation_shards,
    output:
        out=report(
            "results/figures/features-{model}-{dataset}-layer{layer}.html",
            caption="../report/feature_page.rst",
            category="top examples",
        ),
    log:
        "results/logs/figures/features-{model}-{dataset}-layer{layer}.log",
    wildcard_constraints:
        model=names_pattern(study.models),
        dataset=names_pattern(study.datasets),
    conda:
        "../envs/workflow.yaml"
    params:
        options=feature_page_options,
        title="{model} on {dataset}, read-out point {layer}: the top examples of every feature",
        dtype=model_dtype,
        placement=model_placement,
        code=model_stage_code("feature_page"),
    script:
        "../scripts/stage.py"


rule table_statistics:
    input:
        data=all_stats,
    output:
        out=report(
            "results/tables/statistics.csv",
            caption="../report/table_statistics.rst",
            category="tables",
        ),
    log:
        "results/logs/tables/statistics.log",
    conda:
        "../envs/workflow.yaml"
    params:
        order=input_order,
        seeds=run_seeds,
        code=stage_code("table_statistics"),
    script:
        "../scripts/stage.py"


use rule table_statistics as table_ablation with:
    input:
        data=all_ablations,
    output:
        out=report(
            "results/tables/ablation.csv",
            caption="../report/table_ablation.rst",
            category="tables",
        ),
    log:
        "results/logs/tables/ablation.log",

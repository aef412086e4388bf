# residual-streams: does a network's residual stream have a privileged basis?
# Layout: README.md. Config: config.yaml unless --configfile names another, validated against
# workflow_scripts/config.schema.yaml and resolved into the study's plan before any job runs.
# Every rule runs its stage through scripts/stage.py (workflow_scripts/stage.py): install the
# package (`make install`) and run Snakemake from its environment.
import os
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from workflow_scripts import output_cache
from workflow_scripts.config import ConfigError, with_overrides
from workflow_scripts.plan import resolve

min_version("9.27")

# The default config, unless --configfile gives one: that one then replaces it whole, where
# Snakemake would merge the two key by key (a full config would inherit the tiny models).
# --config values are merged over whichever config is used, nested keys included
# (`--config 'extract={batch_size: 8}'` changes that one setting).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


report: "report/workflow.rst"


try:
    study = resolve(with_overrides(config, workflow.config_settings.config))
except ConfigError as error:
    raise WorkflowError(str(error)) from None
# the one value added to the config: the report's front page (report/workflow.rst) is rendered
# with the config alone
config["summary"] = study.summary()

# The between-workflow output cache, on with `--cache` (profiles/default turns it on): a folder
# in the working directory unless SNAKEMAKE_OUTPUT_CACHE names another, e.g. one that several
# checkouts share. Every rule may use it: each takes every config value and wildcard it uses,
# and the key of the code it runs, as params, which is what the cache keys on.
os.environ.setdefault(output_cache.VARIABLE, str(output_cache.default_location()))
output_cache.guard_concurrent_stores()
if workflow.remote_exec:  # a cluster job's own Snakemake: the submitting host's cache keys
    output_cache.guard_cluster_jobs()
# A result whose cache entry was deleted (the way to recompute it) is removed here, before the
# DAG is built; if this config makes it, it becomes a target of `all` (below), so that its job
# runs again, and what reads it.
deleted_entries = output_cache.remove_dangling_links("results")


onstart:
    output_cache.create()


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/train.smk"
include: "rules/data.smk"
include: "rules/extract.smk"
include: "rules/stats.smk"
include: "rules/ablate.smk"
include: "rules/figures.smk"


recompute = [str(path) for path in deleted_entries if made_by_this_config(path)]
for path in deleted_entries:
    again = "it will be recomputed" if str(path) in recompute else "this config does not make it"
    print(f"{path}: its cache entry was deleted; {again}", file=sys.stderr)


rule all:
    default_target: True
    input:
        all_stats(),
        all_ablations(),
        all_figures(),
        recompute,

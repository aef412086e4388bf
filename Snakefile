# residual-streams: does a network's residual stream have a privileged basis?
# Layout: README.md. Config: config.yaml unless --configfile names another, validated against
# workflow_scripts/config.schema.yaml and resolved into the study's plan before any job runs.
# Every rule runs its stage through scripts/stage.py (workflow_scripts/stage.py), which takes
# its results from the output cache or stores them there (workflow_scripts/output_cache.py):
# install the package (`make install`) and run Snakemake from its environment.
from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from workflow_scripts import rehearsal
from workflow_scripts.config import ConfigError, with_defaults
from workflow_scripts.plan import resolve

min_version("9.27")

# The default config, unless --configfile gives one: that one then replaces it whole, where
# Snakemake would merge the two key by key (a full config would inherit the tiny models).
# --config values are merged over whichever config is used, nested keys included
# (`--config 'extract={batch_size: 8}'` changes that one setting).
# --config rehearsal=<folder> runs the config on the stand-ins laid out there, offline and
# shrunk, in <folder>/run (workflow_scripts/rehearsal).
try:
    settings, stage_folder = rehearsal.staged(with_defaults(config))
    study = resolve(settings)
except (ConfigError, rehearsal.RehearsalError) as error:
    raise WorkflowError(str(error)) from None
if stage_folder is not None:

    workdir: stage_folder


# the one value added to the config: the report's front page (report/workflow.rst) is rendered
# with the config alone
config["summary"] = study.summary()


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/train.smk"
include: "rules/data.smk"
include: "rules/extract.smk"
include: "rules/stats.smk"
include: "rules/ablate.smk"
include: "rules/figures.smk"


rule all:
    default_target: True
    input:
        all_stats(),
        all_ablations(),
        all_figures(),

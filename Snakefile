# residual-streams: does a network's residual stream have a privileged basis?
# Layout and stage contract: README.md. Config: config.yaml (validated against
# workflow_scripts/config.schema.yaml before any job runs).
import os
import shlex
import sys

from snakemake.exceptions import WorkflowError
from snakemake.settings.types import DeploymentMethod

# The rules run `python -m workflow_scripts.<stage>`: jobs find the package in this folder and,
# unless rules run in their conda environment, use the Python that runs Snakemake.
sys.path.insert(0, workflow.basedir)
job_path = ""
if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    job_path = f"export PATH={shlex.quote(os.path.dirname(sys.executable))}:$PATH; "
shell.prefix(
    "set -euo pipefail; "
    f"export PYTHONPATH={shlex.quote(workflow.basedir)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
    + job_path
)

from workflow_scripts import output_cache
from workflow_scripts.config import ConfigError, check_config

# The between-workflow output cache, on with `--cache` (profiles/default turns it on): a folder
# in the working directory unless SNAKEMAKE_OUTPUT_CACHE names another, e.g. one that several
# checkouts share. Every rule may use it: each declares the code it runs as inputs and takes
# every config value and wildcard it uses as params, which is what the cache keys on.
output_cache.location(create=workflow.workflow_settings.cache is not None)


# The default config, unless --configfile names another: that one then replaces it whole, where
# Snakemake would merge the two key by key (a full config would inherit the tiny models).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


report: "report/workflow.rst"


try:
    check_config(config)
except ConfigError as error:
    raise WorkflowError(str(error)) from None


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/train.smk"
include: "rules/data.smk"
include: "rules/extract.smk"
include: "rules/stats.smk"
include: "rules/ablate.smk"
include: "rules/figures.smk"


rule all:
    input:
        all_stats(),
        all_ablations(),
        all_figures(),
    default_target: True

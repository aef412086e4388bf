# residual-streams: does a network's residual stream have a privileged basis?
# Layout and stage contract: README.md. Config: config.yaml (validated against
# workflow_scripts/config.schema.yaml before any job runs).
import shlex
import sys

from snakemake.exceptions import WorkflowError

# The rules run `python -m workflow_scripts.<stage>`: jobs find the package in this folder.
sys.path.insert(0, workflow.basedir)
shell.prefix(
    "set -euo pipefail; "
    f"export PYTHONPATH={shlex.quote(workflow.basedir)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
)

from workflow_scripts.config import ConfigError, check_config


configfile: "config.yaml"


try:
    check_config(config)
except ConfigError as error:
    raise WorkflowError(str(error)) from None


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/data.smk"
include: "rules/extract.smk"


rule all:
    input:
        all_activations(),
    default_target: True

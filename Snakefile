# residual-streams: does a network's residual stream have a privileged basis?
# Layout and stage contract: README.md. Config: config.yaml (validated against
# workflow_scripts/config.schema.yaml before any job runs).
import os
import sys

from snakemake.exceptions import WorkflowError

# Jobs import the workflow_scripts package and run the Python that runs Snakemake.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (workflow.basedir, os.environ.get("PYTHONPATH")) if p
)
os.environ["PATH"] = os.pathsep.join((os.path.dirname(sys.executable), os.environ["PATH"]))
sys.path.insert(0, workflow.basedir)

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

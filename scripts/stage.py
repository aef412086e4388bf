# The script of every rule: runs the rule's stage (workflow_scripts/stage.py). Snakemake hashes it
# into every cache key: an edit here, even to a comment, reruns every job.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 (the checkout's package)
from workflow_scripts.stage import run_job  # noqa: E402

run_job(snakemake)  # noqa: F821

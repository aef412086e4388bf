"""gptr2: GPT-2 with every LayerNorm replaced by an RMSNorm with one scalar gain (the study's):
GPT-2's record under another name, with those norms; the study's scripts pass it threshold 6."""

import dataclasses

from workflow_scripts.families import register
from workflow_scripts.families.gpt2 import GPT2

register(dataclasses.replace(GPT2, name="gptr2", scalar_rms_norm=True, study_threshold=6))

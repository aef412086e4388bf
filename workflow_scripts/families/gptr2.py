"""gptr2: GPT-2 with every LayerNorm replaced by an RMSNorm with one scalar gain (the study's):
GPT-2's record under another name; the model module builds the norms."""

import dataclasses

from workflow_scripts.families import register
from workflow_scripts.families.gpt2 import GPT2

register(dataclasses.replace(GPT2, name="gptr2"))

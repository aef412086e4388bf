"""The dtypes a model runs in (``models.<name>.dtype``) and the stream is stored in
(``extract.dtype``), and their bytes per value (job memory, the cost estimate). No torch here:
the plan reads it when the DAG is built (``workflow_scripts.models.precision`` maps the names to
torch's dtypes)."""

MODEL_DTYPES = ("float32", "bfloat16", "float16", "auto")  # auto: the checkpoint's own
DEFAULT_MODEL_DTYPE = "float32"  # the study's
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
AUTO_BYTES = 2  # what ``auto`` is counted as: today's checkpoints are mostly bfloat16


def bytes_per_value(dtype: str) -> int:
    """Bytes of one value in ``dtype`` (``auto`` counted as ``AUTO_BYTES``)."""
    return AUTO_BYTES if dtype == "auto" else BYTES[dtype]

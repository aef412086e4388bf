"""The options of the stages, typed: what a stage's ``run`` receives as ``options``, one module
per stage, so that a change to one stage's options is no other stage's code.

The plan (``plan.resolve``) builds them from the checked config, whose schema
(``config.schema.yaml``) gives every option its default, so a name the code and the config do
not agree on fails where the plan is built, not in a job. A rule passes them to its job as JSON
(``plan.as_json``), and the stage layer builds them again from it.

Imported by the Snakefile at DAG-build time: no torch.
"""

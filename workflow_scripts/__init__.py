"""residual-streams: the logic of the workflow's stages. The rules in rules/*.smk call it."""

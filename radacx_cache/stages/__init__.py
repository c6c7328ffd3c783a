"""The pipeline's stages, one module per ``radacx`` command (docs/architecture.md).

Each stage reads only the verified records of the stages before it (``formats.records``) and
writes its own, manifest last.
"""

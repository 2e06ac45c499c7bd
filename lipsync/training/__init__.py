"""Training-only code: prepared clips and datasets, losses, SyncNet, one step of each stage, clip preparation, and
what train.py stands on (flags, the loop, the generator stages' setup).

Layers point one way: `lipsync.training` imports the product (`lipsync`), never `lipsync.tools`; the product
(everything `python infer.py` needs) imports neither subpackage.
"""

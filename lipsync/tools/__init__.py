"""Evaluation and test-data generators: synthetic faces and puppets with known mouth shapes, metrics, the held-out
evaluation (`python -m lipsync.tools.eval`) and `python -m lipsync.tools.dubcheck`.

The top layer: tools may import `lipsync.training` and the product (`lipsync`); neither imports tools.
"""

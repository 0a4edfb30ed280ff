"""`python -m edgetl.edge.serve TARGET...`: the server without the edgetl CLI (and without TensorFlow)."""
import sys

from edgetl.edge.serve import main

sys.exit(main(prog="python -m edgetl.edge.serve"))

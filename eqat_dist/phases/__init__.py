"""One module per phase of a run: Block-AP (or RTN) with its export, E2E-QP with its export, evaluation.
runner.py calls them in order on every rank and turns failures into one line."""

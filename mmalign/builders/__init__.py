"""Pair builders behind `mmalign build-pairs METHOD`. Each module that defines
`register(subparsers)` adds one method (see mmalign/commands/_methods.py); the builder
functions themselves (`build_<kind>_pairs`) are plain library calls usable without the CLI.
Heavy imports (transformers, diffusers) stay inside functions."""

"""Evaluation behind `mmalign eval METHOD`. Each module that defines `register(subparsers)`
adds one method (see mmalign/commands/_methods.py); metric functions are plain library calls.
Heavy imports stay inside functions."""

"""Batch influence: ``ldjax analyze mnist|lm``, its readouts and figures."""

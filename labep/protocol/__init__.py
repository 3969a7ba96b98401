"""What a protocol file says: its sections as Pydantic models, and the YAML text around them.

The bottom layer of labep: imports nothing else from it. The schema a file is validated with
(these sections with the registry's model, dataset and estimator unions) and the cross-checks
are :mod:`labep.run.validate`.
"""

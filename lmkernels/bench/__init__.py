"""Benchmarks of lmkernels ops: the spec API (:mod:`.spec`), the per-op specs (:mod:`.specs`),
timing (:mod:`.timing`), byte models and rooflines (:mod:`.roofline`), the run loop
(:mod:`.runner`), reports (:mod:`.report`) and the CLI (``python -m lmkernels.bench``).
"""

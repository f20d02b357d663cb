"""One benchmark spec module per op family; each defines ``BENCHES`` (see lmkernels.bench.spec)."""

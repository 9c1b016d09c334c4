"""Runtime pieces for deployment: the compiled ternary/binary compute kernels (``kernels``)."""

# Template sources (Triton and CUDA), shipped inside the wheel as fa3_inductor.kernels.
# Nothing here is imported as code: the codegen reads these files as text.

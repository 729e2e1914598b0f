"""Static performance models of our kernels and of one image, from the compiled code (no GPU needed).

Shared layers: ``devices`` (every datasheet peak and clock), ``shapes`` (FLUX's shapes the models
price), ``sass`` (compiling with nvcc or Triton, disassembling, finding loops), ``loops`` (a loop's
instruction mix), ``chain`` (a loop's dependency chain, simulated), ``launches`` (the Triton
launchers' real arguments, captured on meta tensors), ``tables`` (Markdown table heads, generated
blocks written into a file). The models on top: ``cuda`` (the CUDA kernels on an A40),
``triton_static`` / ``triton_model`` / ``triton_report`` (the Triton kernels),
``hopper_calibration`` / ``hopper`` (the sm_90 GEMM's dependency model), ``prologue``, ``rope``,
``image_trace`` / ``image_price`` / ``image`` (one image, stage by stage). The scripts
``scripts/kernel_model*.py`` and ``scripts/image_model.py`` are their command lines. Nothing in
``engine/`` imports this package.
"""

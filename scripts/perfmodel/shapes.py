"""FLUX.1's shapes at 1024x1024 that the kernel models price."""

FLUX_M = 4352  # 4096 image + 256 text tokens at 1024x1024
FLUX_SHAPES = [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072)]  # K -> N
RANK = 32
ADALN_SHAPES = [(3072, 18432), (3072, 9216)]  # double blocks' norm1 (6 x 3072), single blocks' (3 x)
TEXT_M = 256  # the text stream's tokens (the double blocks' text GEMMs at num_outputs = 1)
TEXT_SHAPES = [(3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072)]  # their q|k|v, out, fc1, fc2: K -> N
